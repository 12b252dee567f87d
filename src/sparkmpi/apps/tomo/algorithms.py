"""Slice reconstruction: ART (Kaczmarz, as TomViz's ``Recon_ART``), SIRT and FBP.

All algorithms take a stack of sinograms (nz, n_angles, n_det) that share one geometry and
return slices (nz, n, n). ART is the sequential row-by-row Kaczmarz sweep; it is vectorised
*across slices* (every row update is applied to all slices at once, since they share the
matrix), never by reordering or batching the rows, so each slice sees exactly the textbook
sequence of updates.

Every algorithm takes ``backend``: ``"cpu"`` (numpy, scipy.sparse, numba) or ``"cupy"`` (the
GPU, see :mod:`.gpu`). SIRT and FBP are written once against the backend's array module, so
both backends run the same code; ART on the GPU is its own kernel with the same row order.
Results are host numpy float32 arrays whatever the backend.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import numba
import numpy as np
import scipy.sparse as sp

from sparkmpi.apps.cuda import require_cupy, to_host
from sparkmpi.apps.tomo import gpu
from sparkmpi.apps.tomo.projector import row_norms_sq

Progress = Callable[[int, int], None] | None
BACKENDS = ("cpu", "cupy")
FILTERS = ("ramlak", "shepp-logan", "hann")  # FBP's
_TILE = 32  # voxel columns per tile edge in backproject_columns


@dataclass(frozen=True)
class ArrayBackend:
    """Where SIRT and FBP run: ``xp`` numpy and ``sparse`` scipy.sparse on the host (``cpu``),
    or cupy and cupyx.scipy.sparse on the current GPU (``cupy``)."""

    name: str
    xp: ModuleType
    sparse: ModuleType

    def to_host(self, array) -> np.ndarray:
        """``array`` as a host numpy array (copied from the device if need be)."""
        return np.asarray(to_host(array))

    def synchronize(self) -> None:
        """Returns once the work queued on the device so far has finished."""
        if self.name == "cupy":
            self.xp.cuda.get_current_stream().synchronize()


def array_backend(name: str) -> ArrayBackend:
    """The backend called ``name``: ValueError naming the choices for an unknown one, and for
    ``cupy`` where no GPU can be used GPUUnavailable, one line, before anything else."""
    if name == "cpu":
        return ArrayBackend("cpu", np, sp)
    if name == "cupy":
        cupy = require_cupy()
        import cupyx.scipy.sparse

        return ArrayBackend("cupy", cupy, cupyx.scipy.sparse)
    raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, not {name!r}")


@numba.njit(cache=True)
def _kaczmarz_sweep(indptr, indices, data, norms, b, x, beta):
    """One pass over all rows; x (pixels, slices) and b (rows, slices) updated per row."""
    n_slices = x.shape[1]
    dot = np.empty(n_slices, dtype=np.float32)
    for j in range(indptr.size - 1):
        if norms[j] <= 0.0:
            continue
        start, stop = indptr[j], indptr[j + 1]
        dot[:] = 0.0
        for k in range(start, stop):
            v = data[k]
            col = x[indices[k]]
            for s in range(n_slices):
                dot[s] += v * col[s]
        scale = beta / norms[j]
        for s in range(n_slices):
            dot[s] = (b[j, s] - dot[s]) * scale
        for k in range(start, stop):
            v = data[k]
            col = x[indices[k]]
            for s in range(n_slices):
                col[s] += v * dot[s]


def _as_columns(sinograms, A: sp.csr_matrix, xp: ModuleType = np):
    """Sinograms (nz, n_angles, n_det) as the right-hand sides (rows, nz) of ``A``, in ``xp``."""
    sinograms = xp.asarray(sinograms, dtype=xp.float32)
    nz = sinograms.shape[0]
    b = sinograms.reshape(nz, -1)
    if b.shape[1] != A.shape[0]:
        raise ValueError(f"sinograms {sinograms.shape[1:]} do not match the matrix {A.shape}")
    return xp.ascontiguousarray(b.T)


def _as_slices(x, xp: ModuleType = np):
    n = math.isqrt(x.shape[0])
    return xp.ascontiguousarray(x.T).reshape(x.shape[1], n, n)


def art(
    sinograms: np.ndarray,
    A: sp.csr_matrix,
    iterations: int,
    beta: float = 1.0,
    positivity: bool = True,
    x0: np.ndarray | None = None,
    progress: Progress = None,
    backend: str = "cpu",
) -> np.ndarray:
    """ART slices (nz, n, n): ``iterations`` Kaczmarz sweeps over the rows of ``A`` in order.

    Each row update is ``x += beta (b_j - a_j·x) / |a_j|² a_j`` (rows of zero norm skipped),
    starting from ``x0`` (default zeros); with ``positivity`` negative voxels are zeroed after
    every sweep. ``progress(i, iterations)`` is called after sweep i. ``backend="cupy"`` runs
    the sweeps on the GPU (:func:`.gpu.art`), equal to float32 rounding.
    """
    if array_backend(backend).name == "cupy":
        return gpu.art(sinograms, A, iterations, beta, positivity, x0, progress)
    b = _as_columns(sinograms, A)
    nz = b.shape[1]
    if x0 is None:
        x = np.zeros((A.shape[1], nz), dtype=np.float32)
    else:
        x = np.array(np.asarray(x0, dtype=np.float32).reshape(nz, -1).T, order="C")
    norms = row_norms_sq(A)
    for i in range(iterations):
        _kaczmarz_sweep(A.indptr, A.indices, A.data, norms, b, x, np.float32(beta))
        if positivity:
            np.maximum(x, 0, out=x)
        if progress is not None:
            progress(i, iterations)
    return _as_slices(x)


def art_textbook(
    sinogram: np.ndarray,
    A: sp.csr_matrix,
    iterations: int,
    beta: float = 1.0,
    positivity: bool = True,
    norms: np.ndarray | None = None,
) -> np.ndarray:
    """ART of one slice (n, n) the way TomViz's ``Recon_ART`` loops: row by row in Python,
    each row taken out of the sparse matrix as a dense vector. The reference for :func:`art`.
    ``norms`` (the squared row norms) may be passed in to leave their set-up out of timings.
    """
    b = np.asarray(sinogram, dtype=np.float32).ravel()
    f = np.zeros(A.shape[1], dtype=np.float32)
    row = np.zeros(A.shape[1], dtype=np.float32)
    if norms is None:
        norms = np.zeros(A.shape[0], dtype=np.float32)
        for j in range(A.shape[0]):
            row[:] = A[j, :].toarray()
            norms[j] = np.dot(row, row)
    for _ in range(iterations):
        for j in range(A.shape[0]):
            row[:] = A[j, :].toarray()
            if norms[j] > 0:
                a = (b[j] - np.dot(row, f)) / norms[j]
                f = f + row * np.float32(a * beta)
        if positivity:
            f[f < 0] = 0
    n = math.isqrt(f.size)
    return f.reshape(n, n)


def _sirt_operators(A: sp.csr_matrix, backend: ArrayBackend) -> tuple:
    """``A``, ``Aᵀ`` (CSR) and the inverse row and column sums of ``A`` (columns, 0 where a sum
    is 0) in the backend's arrays; on the GPU built once per matrix and device."""

    def build(A: sp.csr_matrix) -> tuple:
        row_sums = np.asarray(A.sum(axis=1), dtype=np.float32).ravel()
        col_sums = np.asarray(A.sum(axis=0), dtype=np.float32).ravel()
        inv_r = np.divide(1, row_sums, out=np.zeros_like(row_sums), where=row_sums > 0)[:, None]
        inv_c = np.divide(1, col_sums, out=np.zeros_like(col_sums), where=col_sums > 0)[:, None]
        AT = A.T.tocsr()
        if backend.name == "cpu":
            return A, AT, inv_r, inv_c
        xp, sparse = backend.xp, backend.sparse
        return sparse.csr_matrix(A), sparse.csr_matrix(AT), xp.asarray(inv_r), xp.asarray(inv_c)

    if backend.name == "cpu":
        return build(A)
    return gpu.device_system_matrix(A).cached("sirt", build)


def sirt(
    sinograms: np.ndarray,
    A: sp.csr_matrix,
    iterations: int,
    positivity: bool = True,
    progress: Progress = None,
    backend: str = "cpu",
) -> np.ndarray:
    """SIRT slices (nz, n, n): ``x += C Aᵀ R (b - A x)`` from ``x = 0``, with R, C the inverse
    row and column sums of ``A``; all slices at once, on ``backend``'s arrays (the same code
    for numpy and cupy). ``progress(i, iterations)`` is called after iteration i has finished.
    """
    be = array_backend(backend)
    xp = be.xp
    b = _as_columns(sinograms, A, xp)
    M, MT, inv_r, inv_c = _sirt_operators(A, be)
    x = xp.zeros((A.shape[1], b.shape[1]), dtype=xp.float32)
    for i in range(iterations):
        x += inv_c * (MT @ (inv_r * (b - M @ x)))
        if positivity:
            xp.maximum(x, 0, out=x)
        if progress is not None:
            be.synchronize()
            progress(i, iterations)
    return be.to_host(_as_slices(x, xp))


def _ramp_filter(n_det: int, kind: str) -> tuple[np.ndarray, int]:
    size = max(64, 1 << int(np.ceil(np.log2(2 * n_det))))
    freq = np.fft.rfftfreq(size)
    # the spatial-domain Ram-Lak kernel avoids the DC offset of the naive |f| ramp
    k = np.arange(-(size // 2), size // 2)
    h = np.zeros(size)
    h[size // 2] = 0.25
    odd = k % 2 == 1
    h[odd] = -1.0 / (np.pi * k[odd]) ** 2
    ramp = np.abs(np.fft.rfft(np.fft.ifftshift(h)))
    if kind == "shepp-logan":
        ramp = ramp * np.sinc(freq)
    elif kind == "hann":
        ramp = ramp * (0.5 + 0.5 * np.cos(2 * np.pi * freq))
    elif kind not in FILTERS:
        raise ValueError(f"filter must be one of {', '.join(FILTERS)}, not {kind!r}")
    return ramp, size


def ramp_filtered(sinograms, filter: str = "ramlak", xp: ModuleType = np):
    """``sinograms`` (..., n_det) filtered along the detector axis with ``filter`` (ramlak,
    shepp-logan, hann), float32, in ``xp``'s arrays."""
    n_det = sinograms.shape[-1]
    ramp, size = _ramp_filter(n_det, filter)
    sinograms = xp.asarray(sinograms, dtype=xp.float32)  # float32 transforms: half the work
    spectrum = xp.fft.rfft(sinograms, n=size, axis=-1) * xp.asarray(ramp, dtype=xp.float32)
    return xp.fft.irfft(spectrum, n=size, axis=-1)[..., :n_det].astype(xp.float32)


def fbp(
    sinograms: np.ndarray,
    angles_deg: np.ndarray,
    n: int | None = None,
    center: float | None = None,
    filter: str = "ramlak",
    backend: str = "cpu",
) -> np.ndarray:
    """Filtered back-projection slices (nz, n, n), in the geometry of :mod:`.projector`: on
    the CPU the numba kernel :func:`backproject_columns`, on the GPU cupy arrays (the same sum,
    angle by angle)."""
    be = array_backend(backend)
    xp = be.xp
    sinograms = xp.asarray(sinograms, dtype=xp.float32)
    nz, n_angles, n_det = sinograms.shape
    n = n_det if n is None else n
    center = (n_det - 1) / 2 if center is None else float(center)
    filtered = ramp_filtered(sinograms, filter, xp)
    theta = np.deg2rad(np.asarray(angles_deg, dtype=np.float64))
    if xp is np:
        columns = np.ascontiguousarray(filtered.transpose(1, 2, 0))  # (angles, bins, slices)
        out = np.zeros((n, n, nz), dtype=np.float32)
        backproject_columns(columns, np.cos(theta), np.sin(theta), center, out)
        return np.ascontiguousarray(out.transpose(2, 0, 1)) * np.float32(np.pi / n_angles)
    return be.to_host(_backproject_gather(filtered, theta, n, center, xp) * (np.pi / n_angles))


def _backproject_gather(filtered, theta: np.ndarray, n: int, center: float, xp: ModuleType):
    """The back-projection sum (nz, n, n) of ``filtered`` (nz, angles, bins) in ``xp``'s
    arrays, one gather per angle (the GPU path, and the reference the kernel is tested on)."""
    nz, n_angles, n_det = filtered.shape
    coords = xp.arange(n) - (n - 1) / 2
    yy, xx = xp.meshgrid(coords, coords, indexing="ij")
    out = xp.zeros((nz, n * n), dtype=xp.float32)
    flat = filtered.reshape(nz * n_angles, n_det)
    for a, angle in enumerate(theta):
        t = (xx * np.cos(angle) + yy * np.sin(angle)).ravel() + center
        i0 = xp.floor(t).astype(xp.int64)
        w = (t - i0).astype(xp.float32)
        inside = (i0 >= 0) & (i0 + 1 < n_det)
        i0c = xp.clip(i0, 0, n_det - 2)
        rows = flat[a::n_angles]
        value = rows[:, i0c] * (1 - w) + rows[:, i0c + 1] * w
        out += xp.where(inside, value, 0)
    return out.reshape(nz, n, n)


@numba.njit(parallel=True, fastmath=True, cache=True)
def backproject_columns(filtered, cosines, sines, center, out):  # pragma: no cover - compiled
    """Adds the back-projections of ``filtered`` (angles, bins, slices) to ``out`` (n, n,
    slices), with linear interpolation in the geometry of :func:`fbp`. Slices are innermost:
    in parallel-beam geometry every slice of a voxel column shares an angle's interpolation
    weights, so they are computed once per column and angle and the slice loop vectorizes.
    Voxel columns go in square tiles, all angles per tile: an angle's few bins under a tile
    stay in cache while the tile's columns use them."""
    count, bins, slices = filtered.shape
    n = out.shape[0]
    half = (n - 1) / 2
    per_row = (n + _TILE - 1) // _TILE
    for tile in numba.prange(per_row * per_row):
        y0, x0 = (tile // per_row) * _TILE, (tile % per_row) * _TILE
        for a in range(count):
            for iy in range(y0, min(y0 + _TILE, n)):
                y = iy - half
                for ix in range(x0, min(x0 + _TILE, n)):
                    t = (ix - half) * cosines[a] + y * sines[a] + center
                    i0 = int(np.floor(t))
                    if i0 >= 0 and i0 + 1 < bins:
                        right = np.float32(t - i0)
                        left = np.float32(1.0) - right
                        for z in range(slices):
                            out[iy, ix, z] += (
                                filtered[a, i0, z] * left + filtered[a, i0 + 1, z] * right
                            )


def estimate_center(sinogram: np.ndarray, angles_deg: np.ndarray, search: float = 0.25) -> float:
    """The rotation-axis position (detector bins) of a ~180° scan, to a tenth of a bin: the
    centre whose FBP slice has the least total variation among candidates within
    ``search * n_det`` of the middle."""
    sinogram = np.asarray(sinogram, dtype=np.float32)
    n_det = sinogram.shape[-1]
    middle = (n_det - 1) / 2

    def roughness(center: float) -> float:
        image = fbp(sinogram[None], angles_deg, center=center)[0]
        return float(np.abs(np.diff(image, axis=0)).sum() + np.abs(np.diff(image, axis=1)).sum())

    coarse = np.arange(middle - search * n_det, middle + search * n_det + 1, 1.0)
    best = min(coarse, key=roughness)
    fine = np.arange(best - 1, best + 1.01, 0.1)
    return float(min(fine, key=roughness))


def rmse(estimate: np.ndarray, truth: np.ndarray) -> float:
    """Root-mean-square difference of two equally shaped arrays."""
    diff = np.asarray(estimate, dtype=np.float64) - np.asarray(truth, dtype=np.float64)
    return float(np.sqrt(np.mean(diff**2)))
