"""Parallel-beam projector: the ray-length system matrix of one slice geometry.

A slice is an ``n x n`` grid of unit pixels centred on the rotation axis; column ``iy * n + ix``
is pixel (``iy``, ``ix``). Row ``a * n_det + d`` is the ray through detector bin ``d`` at angle
``a``: the line ``x cos θ + y sin θ = d - center`` (the beam along +y at θ = 0, so the
projection at 0° sums each column of the slice). Entries are the exact lengths of that line
inside each pixel. Every slice of a tilt series shares one matrix, so it is built once per
process and cached.
"""

from __future__ import annotations

from functools import lru_cache

import numba
import numpy as np
import scipy.sparse as sp

_EPS = 1e-7


@numba.njit(cache=True)
def _ray_crossings(n, t, c, s, out_cols, out_lens, write):
    """Pixels crossed by the line x c + y s = t (unit direction (-s, c)) and the lengths inside."""
    half = n / 2.0
    px, py = t * c, t * s
    ux, uy = -s, c
    lam = np.empty(2 * n + 2)
    k = 0
    if abs(ux) > _EPS:
        for i in range(n + 1):
            lam[k] = (i - half - px) / ux
            k += 1
    if abs(uy) > _EPS:
        for i in range(n + 1):
            lam[k] = (i - half - py) / uy
            k += 1
    lam = np.sort(lam[:k])
    count = 0
    for i in range(k - 1):
        length = lam[i + 1] - lam[i]
        if length <= _EPS:
            continue
        mid = 0.5 * (lam[i] + lam[i + 1])
        ix = int(np.floor(px + mid * ux + half))
        iy = int(np.floor(py + mid * uy + half))
        if 0 <= ix < n and 0 <= iy < n:
            if write:
                out_cols[count] = iy * n + ix
                out_lens[count] = length
            count += 1
    return count


@numba.njit(cache=True, parallel=True)
def _count_entries(n, offsets, cosines, sines):
    n_det = offsets.size
    counts = np.zeros(cosines.size * n_det, dtype=np.int64)
    dummy_c = np.empty(0, dtype=np.int32)
    dummy_l = np.empty(0, dtype=np.float32)
    for row in numba.prange(counts.size):
        a, d = row // n_det, row % n_det
        counts[row] = _ray_crossings(n, offsets[d], cosines[a], sines[a], dummy_c, dummy_l, False)
    return counts


@numba.njit(cache=True, parallel=True)
def _fill_entries(n, offsets, cosines, sines, indptr, cols, lens):
    n_det = offsets.size
    for row in numba.prange(indptr.size - 1):
        a, d = row // n_det, row % n_det
        start, stop = indptr[row], indptr[row + 1]
        _ray_crossings(
            n, offsets[d], cosines[a], sines[a], cols[start:stop], lens[start:stop], True
        )


@lru_cache(maxsize=8)
def system_matrix(
    n: int,
    angles_deg: tuple[float, ...],
    n_det: int | None = None,
    center: float | None = None,
) -> sp.csr_matrix:
    """The (n_angles * n_det, n * n) float32 CSR matrix of exact ray lengths (see module doc).

    ``center`` is the detector position (in bins) of the rotation axis, ``(n_det - 1) / 2`` by
    default. Repeated calls with the same geometry return the same cached matrix; do not
    modify it.
    """
    n_det = n if n_det is None else n_det
    if n < 1 or n_det < 1 or not angles_deg:
        raise ValueError("a slice geometry needs n >= 1, n_det >= 1 and at least one angle")
    center = (n_det - 1) / 2 if center is None else float(center)
    theta = np.deg2rad(np.asarray(angles_deg, dtype=np.float64))
    offsets = np.arange(n_det, dtype=np.float64) - center
    cosines, sines = np.cos(theta), np.sin(theta)
    counts = _count_entries(n, offsets, cosines, sines)
    indptr = np.zeros(counts.size + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    cols = np.empty(indptr[-1], dtype=np.int32)
    lens = np.empty(indptr[-1], dtype=np.float32)
    _fill_entries(n, offsets, cosines, sines, indptr, cols, lens)
    index_type = np.int32 if indptr[-1] < 2**31 else np.int64
    A = sp.csr_matrix(
        (lens, cols.astype(index_type, copy=False), indptr.astype(index_type)),
        shape=(counts.size, n * n),
    )
    A.sort_indices()
    A.n_angles, A.n_det = len(angles_deg), n_det
    return A


def row_norms_sq(A: sp.csr_matrix) -> np.ndarray:
    """Squared Euclidean norm of every row of ``A`` (float32)."""
    return np.asarray(A.multiply(A).sum(axis=1), dtype=np.float32).ravel()


def project(volume: np.ndarray, A: sp.csr_matrix) -> np.ndarray:
    """Sinograms (nz, n_angles, n_det) of a volume (nz, n, n) under the geometry of ``A``."""
    volume = np.asarray(volume, dtype=np.float32)
    nz = volume.shape[0]
    if volume.shape[1] * volume.shape[2] != A.shape[1]:
        raise ValueError(f"volume slices {volume.shape[1:]} do not match the matrix {A.shape}")
    sinos = A @ volume.reshape(nz, -1).T  # (rows, nz)
    return np.ascontiguousarray(sinos.T, dtype=np.float32).reshape(nz, A.n_angles, A.n_det)
