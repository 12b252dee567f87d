"""Tomography as a streaming app (:class:`sparkmpi.streaming.app.StreamingApp`): projections of
a rotating sample arrive in any angular order (sequential, golden-angle) and every batch
refines a filtered back-projection of all projections so far.

Each rank reconstructs a slab of slices (detector rows). Frames reach the rank that owns their
index; at each ``iterate`` the ranks exchange the new projections' rows so every rank gets the
rows of its slab, and add their filtered back-projections (the numba kernel of
:func:`~sparkmpi.apps.tomo.algorithms.fbp`) to its running sum, held (y, x, slice). FBP is linear,
so the volume after the last projection equals the batch FBP of the whole scan, in whatever
order and batches the projections came.

The scan-start carries ``angles_deg`` (one rotation angle per projection, degrees) and
optionally ``center`` (the rotation axis on the detector, in bins; default the middle);
frames are projections, shape (rows, detector bins): line integrals (float32, e.g. -log of
flat-corrected transmission), or, with ``counts: true``, the detector's counts (an integer
dtype) with the white (open beam) and dark images as the payload (two float32 images, little
endian), corrected as :func:`~sparkmpi.apps.tomo.io.line_integrals` does, on the owner rank.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import numba
import numpy as np

from sparkmpi.apps.tomo.algorithms import backproject_columns, estimate_center, ramp_filtered
from sparkmpi.apps.tomo.dxchange import line_integrals
from sparkmpi.streaming.producer import replay
from sparkmpi.streaming.protocol import MalformedRecord, ScanStart, scan_id_or_new

VOXELS_MAX = 1 << 28  # 1 GiB of float32


def start_record(
    angles_deg,
    shape: tuple[int, int],
    scan_id: str,
    center=None,
    white=None,
    dark=None,
    dtype: str = "float32",
) -> ScanStart:
    """The scan-start of a tomography scan of ``len(angles_deg)`` projections of ``shape``:
    line integrals (float32), or with ``white`` and ``dark`` (the open-beam and dark images,
    or numbers) detector counts of ``dtype``, corrected on the ranks."""
    params: dict = {"angles_deg": [float(a) for a in angles_deg]}
    if center is not None:
        params["center"] = float(center)
    payload = b""
    if white is not None:
        params["counts"] = True
        dark = 0 if dark is None else dark
        images = [np.broadcast_to(np.asarray(a, "<f4"), shape) for a in (white, dark)]
        payload = np.ascontiguousarray(np.stack(images)).tobytes()
    return ScanStart(scan_id, len(params["angles_deg"]), tuple(shape), dtype, params, payload)


def as_counts(projections: np.ndarray, white: float = 60000.0) -> np.ndarray:
    """Line integrals as the uint16 counts a detector would see with ``white`` counts of open
    beam (no noise, no dark current)."""
    return np.rint(white * np.exp(-np.asarray(projections, np.float64))).astype(np.uint16)


def scan_to_stream(
    path=None, phantom: int = 64, projections: int = 180, order: str = "sequential", counts=False
) -> tuple[ScanStart, np.ndarray]:
    """A scan-start (scan id ``sim``) and its frames, in ``order`` (sequential or golden), from
    a tilt series ``path`` or, without one, a blobs phantom of ``phantom``³ projected at
    ``projections`` angles over 180°. A Data Exchange file gives the detector's counts with
    its white and dark images and the rotation centre estimated from its middle row; other
    inputs give line integrals, or with ``counts`` the counts of :func:`as_counts` (what a
    detector, e.g. a Stream V2 one, sends)."""
    from sparkmpi.apps.tomo.dxchange import read_dxchange_counts
    from sparkmpi.apps.tomo.io import HDF5_SUFFIXES, read_series
    from sparkmpi.apps.tomo.phantom import blobs_phantom, simulate_tilt_series

    white = dark = center = None
    if path is not None and Path(path).suffix.lower() in HDF5_SUFFIXES:
        data, white, dark, angles = read_dxchange_counts(path)
        frames = np.clip(np.rint(data), 0, np.iinfo(np.uint16).max).astype(np.uint16)
        row = data.shape[1] // 2
        middle = line_integrals(data[:, row], white[row], dark[row])
        binned = middle[:, : middle.shape[1] // 4 * 4].reshape(len(middle), -1, 4).mean(axis=2)
        center = 4 * estimate_center(binned, angles) + 1.5  # in practice the beamline's
    elif path is not None:
        series = read_series(path)
        frames, angles = series.projections, series.angles_deg
    else:
        angles = np.linspace(0, 180, projections, endpoint=False)
        frames = simulate_tilt_series(blobs_phantom((phantom,) * 3), angles)
    if white is None and counts:
        frames, white, dark = as_counts(frames), 60000.0, 0.0
    if order == "golden":
        chosen = golden_order(len(angles))
        frames, angles = frames[chosen], angles[chosen]
    dtype = "float32" if white is None else "uint16"
    return start_record(angles, frames.shape[1:], "sim", center, white, dark, dtype), frames


def golden_order(count: int) -> np.ndarray:
    """Indices of ``count`` equally spaced angles over 180° in golden-angle order (each next
    angle 111.25° on, modulo 180°, rounded to the nearest unused one)."""
    golden = (np.sqrt(5) - 1) / 2
    wanted = (np.arange(count) * golden) % 1.0
    order, free = [], list(range(count))
    for w in wanted:
        best = min(free, key=lambda i: abs(i / count - w))
        free.remove(best)
        order.append(best)
    return np.array(order)


def produce(
    projections: np.ndarray,
    angles_deg,
    url: str,
    rate_hz: float,
    scan_id: str | None = None,
    log=None,
    access=None,
) -> dict:
    """Streams line integrals ``projections`` (count, rows, bins) taken at ``angles_deg`` to
    ``url``, in the given order, at ``rate_hz`` (0: as fast as possible)."""
    scan_id = scan_id_or_new(scan_id)
    projections = np.asarray(projections, dtype=np.float32)
    start = start_record(angles_deg, projections.shape[1:], scan_id)
    return replay(start, projections, url, rate_hz, log, access)


def _angles(start: ScanStart) -> np.ndarray:
    try:
        angles = np.asarray(start.params["angles_deg"], dtype=np.float64)
    except KeyError:
        raise MalformedRecord("no angles_deg") from None
    except (TypeError, ValueError):
        raise MalformedRecord("angles_deg is not a list of numbers") from None
    if angles.shape != (start.frames,) or not np.isfinite(angles).all():
        raise MalformedRecord(f"angles_deg must be {start.frames} finite numbers (one per frame)")
    return angles


def _white_dark(start: ScanStart) -> np.ndarray | None:
    """The (white, dark) images of a scan whose frames are detector counts, else None."""
    if not start.params.get("counts"):
        return None
    if np.dtype(start.dtype).kind not in "ui":
        raise MalformedRecord(f"counts of dtype {start.dtype}: counts are integers")
    size = 2 * int(np.prod(start.shape)) * 4
    if len(start.data) != size:
        raise MalformedRecord(
            f"counts need white and dark images (2 x {start.shape} float32, {size} bytes) as "
            f"payload, got {len(start.data)} bytes"
        )
    return np.frombuffer(start.data, dtype="<f4").reshape(2, *start.shape)


def _center(start: ScanStart) -> float | None:
    center = start.params.get("center")
    if center is None:
        return None
    if isinstance(center, bool) or not isinstance(center, int | float) or not np.isfinite(center):
        raise MalformedRecord(f"center is {center!r}, not a number")
    return float(center)


class TomoStream:
    """One rank's slab of a streamed reconstruction. ``add`` is local; ``iterate`` is
    collective."""

    iterative = False

    @staticmethod
    def check_start(start: ScanStart) -> None:
        """:class:`MalformedRecord` naming what is missing or implausible: angles (one finite
        angle per projection), centre, a volume over 2^28 voxels."""
        try:
            _angles(start), _center(start), _white_dark(start)
            rows, bins = start.shape
            if rows * bins * bins > VOXELS_MAX:
                raise MalformedRecord(f"a {rows} x {bins} x {bins} volume is over {VOXELS_MAX}")
        except MalformedRecord as exc:
            raise MalformedRecord(f"scan-start of scan {start.scan_id}: {exc}") from None

    def __init__(self, start: ScanStart, settings, comm):
        self.comm = comm
        self.angles = _angles(start)
        self.center = _center(start)
        self.white_dark = _white_dark(start)
        rows, self.bins = start.shape
        bounds = np.linspace(0, rows, comm.size + 1).round().astype(int)
        self.slabs = list(itertools.pairwise(bounds))
        low, high = self.slabs[comm.rank]
        self.sum = np.zeros((self.bins, self.bins, high - low), dtype=np.float32)
        self.count = 0
        self.pending: list = []
        self.previous = np.zeros((high - low, self.bins, self.bins), dtype=np.float32)
        self.errors: list[float] = []
        self.threads = _cores_per_local_rank(comm)

    def add(self, frames) -> None:
        """Keeps frames (each given once) until the next :meth:`iterate`."""
        if self.white_dark is None:
            self.pending += [(f.index, np.asarray(f.data, dtype=np.float32)) for f in frames]
        else:
            white, dark = self.white_dark
            self.pending += [(f.index, line_integrals(f.data, white, dark)) for f in frames]

    def _exchange(self) -> list:
        outgoing = [
            [(index, data[low:high]) for index, data in self.pending] for low, high in self.slabs
        ]
        self.pending = []
        return [item for part in self.comm.alltoall(outgoing) for item in part]

    def iterate(self, iterations: int) -> dict:
        """Adds the projections that arrived since the last call (``iterations`` does not
        matter: FBP is direct); the volume, three orthogonal slices, the number of projections
        used and, as ``errors``, the relative change of the volume per call."""
        comm = self.comm
        numba.set_num_threads(self.threads)  # per calling thread
        new = self._exchange()
        if new:
            theta = np.deg2rad(self.angles[[index for index, _ in new]])
            filtered = ramp_filtered(np.stack([rows for _, rows in new]))
            center = (self.bins - 1) / 2 if self.center is None else self.center
            columns = np.ascontiguousarray(filtered.transpose(0, 2, 1))
            backproject_columns(columns, np.cos(theta), np.sin(theta), center, self.sum)
            self.count += len(new)
        scale = np.float32(np.pi / max(self.count, 1))
        slab, change, total = _slab_and_change(self.sum, scale, self.previous)
        change, total = comm.allreduce(np.array([change, total]))
        self.previous = slab
        if new or not self.errors:
            self.errors.append(float(np.sqrt(change / total)) if total > 0 else 1.0)
        slabs = comm.gather(slab, root=0)
        if comm.rank != 0:
            return {}
        volume = np.concatenate(slabs)
        return {
            "volume": volume,
            "slices": _orthoslices(volume),
            "projections": self.count,
            "errors": list(self.errors),
        }

    def restore(self, result: dict) -> None:
        """Nothing to restore: FBP is a function of the projections alone, and the
        checkpointed projections are given to the new ranks again."""

    @staticmethod
    def picture(result: dict, path, title: str = "") -> None:
        """Three orthogonal central slices of the volume as a PNG."""
        from sparkmpi.apps.tomo.volume import save_orthoslices_png

        save_orthoslices_png(result["volume"], path, title)


def _cores_per_local_rank(comm) -> int:
    """This host's cores (this process may use) shared among the ranks on it: more kernel
    threads than cores leave every parallel loop waiting for a descheduled thread."""
    from mpi4py import MPI

    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        ranks = local.size
    finally:
        local.Free()
    cores = len(os.sched_getaffinity(0))
    return max(1, min(numba.config.NUMBA_NUM_THREADS, cores // ranks))


@numba.njit(parallel=True, fastmath=True, cache=True)
def _slab_and_change(columns, scale, before):  # pragma: no cover - compiled
    """``columns`` (y, x, slice) times ``scale`` as slices (slice, y, x), the sum of its squared
    difference from ``before`` (slice, y, x) and its squared sum, accumulated in float64."""
    n, _, slices = columns.shape
    out = np.empty((slices, n, n), dtype=np.float32)
    change = total = 0.0
    for iy in numba.prange(n):
        for ix in range(n):
            for z in range(slices):
                value = columns[iy, ix, z] * scale
                out[z, iy, ix] = value
                change += np.float64(value - before[z, iy, ix]) ** 2
                total += np.float64(value) ** 2
    return out, change, total


def _orthoslices(volume: np.ndarray) -> np.ndarray:
    """The central (z, y, x) slices, padded into one (3, m, m) array."""
    nz, ny, nx = volume.shape
    cuts = [volume[nz // 2], volume[:, ny // 2], volume[:, :, nx // 2]]
    m = max(max(c.shape) for c in cuts)
    out = np.zeros((3, m, m), dtype=np.float32)
    for i, cut in enumerate(cuts):
        out[i, : cut.shape[0], : cut.shape[1]] = cut
    return out
