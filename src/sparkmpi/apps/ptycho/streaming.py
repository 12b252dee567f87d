"""Ptychography as a streaming app: the reconstruction is refined with the frames seen so far
while the scan runs (the object grows with it), inside ranks that persist across batches."""

from __future__ import annotations

import numpy as np

from sparkmpi.apps.ptycho.backends import warm_up
from sparkmpi.apps.ptycho.scan import amplitudes
from sparkmpi.apps.ptycho.solver import Solver, SolverSettings


class PtychoStream:
    """One rank's state for one scan. ``add`` is local; ``iterate`` is collective."""

    def __init__(self, scan, settings: SolverSettings | None, comm):
        settings = settings or SolverSettings()
        n = scan.shape[0]
        self.corners = np.rint(np.asarray(scan.positions)).astype(np.int64)
        self.corners -= np.minimum(self.corners.min(axis=0), 0)
        shape = tuple(int(v) for v in self.corners.max(axis=0) + n)
        warm_up(settings.backend, settings.algorithm)
        self.solver = Solver(shape, scan.probe, settings, comm)
        self.seen: set[int] = set()

    def add(self, frames) -> tuple[list, int]:
        """Adds frames not seen before; returns them and how many were duplicates."""
        new, duplicates = [], 0
        for frame in frames:
            if frame.index in self.seen:
                duplicates += 1
            else:
                self.seen.add(frame.index)
                new.append(frame)
        if new:
            stack = np.stack([np.asarray(f.data, dtype=np.float32) for f in new])
            self.solver.add_frames(amplitudes(stack), self.corners[[f.index for f in new]])
        return new, duplicates

    def iterate(self, iterations: int) -> dict:
        """Runs the iterations over all ranks' frames; object, probe and errors so far."""
        rec = self.solver.iterate(iterations)
        return {
            "object": rec.object,
            "probe": rec.probe,
            "errors": rec.errors,
            "illumination": rec.illumination,
        }

    @staticmethod
    def picture(result: dict, path, title: str = "") -> None:
        """The PNG of a streamed result (as for a batch reconstruction)."""
        from sparkmpi.apps.ptycho.figures import save_reconstruction_png
        from sparkmpi.apps.ptycho.solver import Reconstruction

        rec = Reconstruction(
            result["object"], result["probe"], result["errors"], result["illumination"]
        )
        save_reconstruction_png(rec, path, title)
