"""Ptychography as a streaming app (:class:`sparkmpi.streaming.app.StreamingApp`): the
reconstruction is refined with the frames seen so far while the scan runs (the object grows
with it), inside ranks that persist across batches.

Its scan-start record carries ``positions`` (one ``[row, col]`` = ``(y, x)`` window corner per
frame, in object pixels, float), ``geometry`` (``energy_ev``, ``distance_m``,
``pixel_size_m``) and, as payload, the initial probe (N x N complex64, C order).
"""

from __future__ import annotations

import numpy as np

from sparkmpi.apps.ptycho.backends import warm_up
from sparkmpi.apps.ptycho.scan import amplitudes
from sparkmpi.apps.ptycho.solver import Solver, SolverSettings
from sparkmpi.streaming.producer import replay
from sparkmpi.streaming.protocol import MalformedRecord, ScanStart, scan_id_or_new

GEOMETRY = ("energy_ev", "distance_m", "pixel_size_m")
OBJECT_PIXELS_MAX = 1 << 28  # 2 GiB of complex64: more is a mistake or an attack


def start_record(scan, scan_id: str) -> ScanStart:
    """The scan-start record of a :class:`~sparkmpi.apps.ptycho.scan.Scan`."""
    return ScanStart(
        scan_id,
        len(scan.intensities),
        tuple(scan.intensities.shape[1:]),
        str(scan.intensities.dtype),
        {
            "positions": np.asarray(scan.positions, dtype=np.float64).tolist(),
            "geometry": {
                "energy_ev": scan.energy_ev,
                "distance_m": scan.distance_m,
                "pixel_size_m": scan.pixel_size_m,
            },
        },
        np.ascontiguousarray(scan.probe, dtype=np.complex64).tobytes(),
    )


def stream_v2_series(scan) -> tuple[ScanStart, np.ndarray, dict]:
    """What :func:`sparkmpi.streaming.stream_v2_sim.produce_stream_v2` needs to stream
    ``scan`` as a Stream V2 detector would: the scan-start (carried in the start's user
    data), the frames, and the detector's own start fields (energy, wavelength, pixel size)."""
    detector = {
        "incident_energy": float(scan.energy_ev),
        "incident_wavelength": 12398.419843320026 / scan.energy_ev,  # angstrom
        "pixel_size_x": float(scan.pixel_size_m),
        "pixel_size_y": float(scan.pixel_size_m),
    }
    return start_record(scan, "sim"), scan.intensities, detector


def produce(
    scan, url: str, rate_hz: float, scan_id: str | None = None, log=None, access=None
) -> dict:
    """Streams ``scan`` to ``url`` at ``rate_hz`` frames per second (0: as fast as possible),
    as :func:`~sparkmpi.streaming.producer.replay`; a bad ``scan_id`` (default: random) is
    refused before anything is sent."""
    scan_id = scan_id_or_new(scan_id)
    return replay(start_record(scan, scan_id), scan.intensities, url, rate_hz, log, access)


def _positions(start: ScanStart) -> np.ndarray:
    try:
        positions = np.asarray(start.params["positions"], dtype=np.float64)
    except KeyError:
        raise MalformedRecord("no positions") from None
    except (TypeError, ValueError):
        raise MalformedRecord("positions are not a list of [row, col] numbers") from None
    if positions.shape != (start.frames, 2):
        raise MalformedRecord(
            f"{positions.shape} positions for {start.frames} frames, expected one (y, x) each"
        )
    if not np.isfinite(positions).all():
        raise MalformedRecord("positions are not all finite numbers")
    span = np.ptp(positions, axis=0) if len(positions) else np.zeros(2)
    if start.frames > 1 and span.max() < 1:
        raise MalformedRecord(
            f"positions span {span.max():.3g} pixels: they must be object pixels, not metres"
        )
    corners = np.rint(positions)
    extent = corners.max(axis=0) - np.minimum(corners.min(axis=0), 0) + max(start.shape)
    if extent.prod() > OBJECT_PIXELS_MAX:
        raise MalformedRecord(
            f"positions span {int(extent[0])} x {int(extent[1])} object pixels, more than "
            f"{OBJECT_PIXELS_MAX}: are they in object pixels?"
        )
    return positions


def _geometry(start: ScanStart) -> dict:
    geometry = start.params.get("geometry")
    if not isinstance(geometry, dict):
        raise MalformedRecord(f"no geometry ({', '.join(GEOMETRY)})")
    for key in GEOMETRY:
        value = geometry.get(key)
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not number or not np.isfinite(value) or value <= 0:
            raise MalformedRecord(f"geometry {key} is {value!r}, not a positive number")
    return geometry


def _probe(start: ScanStart) -> np.ndarray:
    rows, cols = start.shape
    if rows != cols:
        raise MalformedRecord(f"frames of {rows} x {cols}: ptychography needs square frames")
    probe = np.frombuffer(start.data, dtype=np.complex64)
    if probe.size != rows * cols:
        raise MalformedRecord(f"probe of {probe.size} complex64 values for {rows} x {cols}")
    if not np.isfinite(probe).all() or not np.abs(probe).any():
        raise MalformedRecord("the probe is zero or not finite")
    return probe.reshape(rows, cols)


class PtychoStream:
    """One rank's state for one scan. ``add`` is local; ``iterate`` is collective."""

    @staticmethod
    def check_start(start: ScanStart) -> None:
        """:class:`MalformedRecord` naming the first of positions, geometry or probe that is
        missing or implausible (see the module docstring for what they must be)."""
        try:
            _positions(start), _geometry(start), _probe(start)
        except MalformedRecord as exc:
            raise MalformedRecord(f"scan-start of scan {start.scan_id}: {exc}") from None

    def __init__(self, start: ScanStart, settings: SolverSettings | None, comm):
        settings = settings or SolverSettings()
        n = start.shape[0]
        self.corners = np.rint(_positions(start)).astype(np.int64)
        self.corners -= np.minimum(self.corners.min(axis=0), 0)
        shape = tuple(int(v) for v in self.corners.max(axis=0) + n)
        warm_up(settings.backend, settings.algorithm)
        self.solver = Solver(shape, _probe(start), settings, comm)

    def add(self, frames) -> None:
        """Adds frames (each given once); their exit waves start from the current object and
        probe."""
        stack = np.stack([np.asarray(f.data, dtype=np.float32) for f in frames])
        self.solver.add_frames(amplitudes(stack), self.corners[[f.index for f in frames]])

    def iterate(self, iterations: int) -> dict:
        """Runs the iterations over all ranks' frames; object, probe and errors so far."""
        rec = self.solver.iterate(iterations)
        return {
            "object": rec.object,
            "probe": rec.probe,
            "errors": rec.errors,
            "illumination": rec.illumination,
        }

    def restore(self, result: dict) -> None:
        """Continues from a durable result: its object, probe and iteration count (so probe
        refinement goes on where it was)."""
        self.solver.restore(result["object"], result["probe"], list(result["errors"]))

    @staticmethod
    def picture(result: dict, path, title: str = "") -> None:
        """The PNG of a streamed result (as for a batch reconstruction)."""
        from sparkmpi.apps.ptycho.figures import save_reconstruction_png
        from sparkmpi.apps.ptycho.solver import Reconstruction

        rec = Reconstruction(
            result["object"], result["probe"], result["errors"], result["illumination"]
        )
        save_reconstruction_png(rec, path, title)
