"""The ``cupy`` backend of the tomography algorithms: ART as one CUDA kernel per sweep, and the
system matrix uploaded once per device.

ART keeps TomViz's row order exactly. A sweep is one launch of :data:`ART_SOURCE`'s
``art_sweep`` in which thread block ``s`` runs the Kaczmarz updates of slice ``s`` over every
row of the matrix, in order: the slices run in parallel, the rows never are. Per row the
block's threads hold the row's non-zeros (prefetched while the previous row is applied), form
``a_j·x`` by a warp-shuffle and shared-memory reduction, each compute the same
``beta (b_j - a_j·x) / |a_j|²`` from the warps' partial sums, and update their pixels; two
``__syncthreads()`` per row order the reduction and make the updates visible to the next row.

Each slice's ``x`` is contiguous, its pixels stored in tiles of 4 rows x 8 columns (one
128-byte line), so a ray at any angle reads several of its pixels per line (row-major order
gives a near-vertical ray one line per pixel). Rows of zero norm, which ART skips, are left
out of the uploaded matrix. SIRT and FBP have no code here: they are the array code of
:mod:`.algorithms`, run with cupy.
"""

from __future__ import annotations

import math
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import numpy as np
import scipy.sparse as sp

from sparkmpi.apps.cuda import require_cupy, to_host
from sparkmpi.apps.tomo.projector import row_norms_sq

ART_CACHE = 4  # non-zeros of a row each thread keeps in registers
TILE = (4, 8)  # pixel rows and columns of one stored tile: 32 floats
MAX_THREADS = 1024
_CACHED_MATRICES = 4

_ART_KERNEL = r"""
extern "C" __global__ void art_sweep(
    const long long* __restrict__ indptr,  /* n_rows + 1 row starts */
    const int* __restrict__ indices,       /* stored pixel position of each non-zero */
    const float* __restrict__ data,
    const float* __restrict__ scales,      /* beta / |a_j|^2 of each row */
    const float* __restrict__ b,           /* (slices, n_rows) */
    float* x,                              /* (slices, n_pix), updated in place */
    int n_rows, int n_pix)
{
    __shared__ float partial[32];
    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    const int n_warps = blockDim.x >> 5;
    const int stride = blockDim.x;
    const float* bs = b + (long long)blockIdx.x * n_rows;
    float* xs = x + (long long)blockIdx.x * n_pix;

    int col[ART_CACHE], next_col[ART_CACHE];
    float val[ART_CACHE], next_val[ART_CACHE], old[ART_CACHE];
    long long start = indptr[0];
    long long stop = indptr[1];
    long long stop2 = n_rows > 1 ? indptr[2] : stop;
#pragma unroll
    for (int c = 0; c < ART_CACHE; ++c) {
        long long k = start + tid + (long long)c * stride;
        col[c] = k < stop ? indices[k] : 0;
        val[c] = k < stop ? data[k] : 0.0f;
    }
    for (int j = 0; j < n_rows; ++j) {
        const float scale = scales[j];
        const float bj = bs[j];
        const long long stop3 = j + 2 < n_rows ? indptr[j + 3] : stop2;
#pragma unroll
        for (int c = 0; c < ART_CACHE; ++c) {
            long long k = stop + tid + (long long)c * stride;
            next_col[c] = k < stop2 ? indices[k] : 0;
            next_val[c] = k < stop2 ? data[k] : 0.0f;
        }
        float dot = 0.0f;
#pragma unroll
        for (int c = 0; c < ART_CACHE; ++c) {
            long long k = start + tid + (long long)c * stride;
            old[c] = k < stop ? xs[col[c]] : 0.0f;
            dot += val[c] * old[c];
        }
        for (long long k = start + tid + (long long)ART_CACHE * stride; k < stop; k += stride)
            dot += data[k] * xs[indices[k]];
        for (int offset = 16; offset > 0; offset >>= 1)
            dot += __shfl_down_sync(0xffffffffu, dot, offset);
        if (lane == 0)
            partial[warp] = dot;
        __syncthreads();
        float total = 0.0f;
        for (int w = 0; w < n_warps; ++w)
            total += partial[w];
        const float a = (bj - total) * scale;
#pragma unroll
        for (int c = 0; c < ART_CACHE; ++c) {
            long long k = start + tid + (long long)c * stride;
            if (k < stop)
                xs[col[c]] = old[c] + val[c] * a;
        }
        for (long long k = start + tid + (long long)ART_CACHE * stride; k < stop; k += stride)
            xs[indices[k]] += data[k] * a;
        __syncthreads();
        start = stop;
        stop = stop2;
        stop2 = stop3;
#pragma unroll
        for (int c = 0; c < ART_CACHE; ++c) {
            col[c] = next_col[c];
            val[c] = next_val[c];
        }
    }
}
"""
ART_SOURCE = f"#define ART_CACHE {ART_CACHE}\n{_ART_KERNEL}"


def pixel_positions(n_pix: int) -> tuple[np.ndarray, int]:
    """Where each pixel (natural order ``iy * n + ix``) is stored in the kernel's slice, and the
    stored slice's length: tiles of :data:`TILE` for a square slice (padded to whole tiles),
    the natural order otherwise. Positions are distinct and below the length."""
    n = math.isqrt(n_pix)
    if n * n != n_pix:
        return np.arange(n_pix, dtype=np.int64), n_pix
    th, tw = TILE
    tiles_x = -(-n // tw)
    iy, ix = np.divmod(np.arange(n_pix, dtype=np.int64), n)
    position = ((iy // th * tiles_x + ix // tw) * th + iy % th) * tw + ix % tw
    return position, -(-n // th) * th * tiles_x * tw


@dataclass(frozen=True)
class ArtLayout:
    """The ART kernel's host arrays for a matrix ``A``: the rows of non-zero norm, in order
    (``rows`` their indices in ``A``, None when all are kept), each entry's column replaced by
    its stored position (duplicates summed), their squared norms as ART computes them, and the
    block size that covers the longest row with :data:`ART_CACHE` entries per thread."""

    indptr: np.ndarray
    indices: np.ndarray
    data: np.ndarray
    norms: np.ndarray
    rows: np.ndarray | None
    position: np.ndarray
    n_store: int
    threads: int


def art_layout(A: sp.csr_matrix) -> ArtLayout:
    """The :class:`ArtLayout` of ``A`` (does not modify ``A``)."""
    norms = row_norms_sq(A)
    keep = norms > 0
    M = A
    if not A.has_canonical_format:
        M = A.copy()
        M.sum_duplicates()
    rows = None if keep.all() else np.flatnonzero(keep)
    if rows is not None:
        M = M[rows]
    position, n_store = pixel_positions(A.shape[1])
    longest = int(np.diff(M.indptr).max()) if M.shape[0] else 0
    threads = 32 * max(1, math.ceil(longest / (ART_CACHE * 32)))
    return ArtLayout(
        indptr=M.indptr.astype(np.int64),
        indices=position[M.indices].astype(np.int32),
        data=M.data.astype(np.float32, copy=False),
        norms=norms[keep],
        rows=rows,
        position=position,
        n_store=n_store,
        threads=min(threads, MAX_THREADS),
    )


class DeviceMatrix:
    """A system matrix on the GPU that was current when it was made: the ART kernel's arrays,
    and whatever else the algorithms :meth:`cached` on it (SIRT's operators)."""

    def __init__(self, A: sp.csr_matrix):
        cp = require_cupy()
        layout = art_layout(A)
        self.shape = A.shape
        self.n_rows = len(layout.norms)
        self.n_store = layout.n_store
        self.threads = layout.threads
        self.indptr = cp.asarray(layout.indptr)
        self.indices = cp.asarray(layout.indices)
        self.data = cp.asarray(layout.data)
        self.norms = cp.asarray(layout.norms)
        self.rows = None if layout.rows is None else cp.asarray(layout.rows)
        self.position = cp.asarray(layout.position)
        self._source = weakref.ref(A)
        self._cached: dict[str, object] = {}

    def cached(self, name: str, build: Callable[[sp.csr_matrix], object]) -> object:
        """``build(A)`` on the first call with ``name``, the same object afterwards."""
        if name not in self._cached:
            A = self._source()
            if A is None:
                raise RuntimeError("the host matrix of this device matrix no longer exists")
            self._cached[name] = build(A)
        return self._cached[name]


_MATRICES: OrderedDict[tuple[int, int], tuple[weakref.ref, DeviceMatrix]] = OrderedDict()


def device_system_matrix(A: sp.csr_matrix) -> DeviceMatrix:
    """``A`` on the current GPU: uploaded on the first call for this matrix object and device,
    the same :class:`DeviceMatrix` on later calls (the few most recently used are kept). ``A``
    must not be modified afterwards, as for :func:`.projector.system_matrix`'s matrices."""
    cp = require_cupy()
    key = (id(A), cp.cuda.Device().id)
    entry = _MATRICES.get(key)
    if entry is not None and entry[0]() is A:
        _MATRICES.move_to_end(key)
        return entry[1]
    matrix = DeviceMatrix(A)
    _MATRICES[key] = (weakref.ref(A), matrix)
    while len(_MATRICES) > _CACHED_MATRICES:
        _MATRICES.popitem(last=False)
    return matrix


@cache
def _art_kernel(device: int):
    cp = require_cupy()
    return cp.RawModule(code=ART_SOURCE).get_function("art_sweep")


def art_sweeps(
    matrix: DeviceMatrix,
    b,
    x,
    iterations: int,
    beta: float = 1.0,
    positivity: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """``iterations`` ART sweeps on the device, in place: ``b`` (slices, rows of the matrix) and
    ``x`` (slices, ``matrix.n_store``) float32 C-contiguous cupy arrays, ``x`` in the stored
    pixel order (``x[:, matrix.position]`` is the natural one). Returns once the sweeps are
    queued; ``progress(i, iterations)`` is called after sweep i has finished."""
    cp = require_cupy()
    nz = x.shape[0]
    if b.shape != (nz, matrix.shape[0]) or x.shape != (nz, matrix.n_store):
        raise ValueError(f"b {b.shape} and x {x.shape} do not fit the matrix {matrix.shape}")
    if matrix.rows is not None:
        b = b[:, matrix.rows]
    b = cp.ascontiguousarray(b, dtype=cp.float32)
    scales = cp.float32(beta) / matrix.norms
    kernel = _art_kernel(cp.cuda.Device().id)
    args = (matrix.indptr, matrix.indices, matrix.data, scales, b, x)
    sizes = (np.int32(matrix.n_rows), np.int32(matrix.n_store))
    for i in range(iterations):
        if nz and matrix.n_rows:
            kernel((nz,), (matrix.threads,), (*args, *sizes))
        if positivity:
            cp.maximum(x, 0, out=x)
        if progress is not None:
            cp.cuda.get_current_stream().synchronize()
            progress(i, iterations)


def art(
    sinograms,
    A: sp.csr_matrix,
    iterations: int,
    beta: float = 1.0,
    positivity: bool = True,
    x0=None,
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """ART slices (nz, n, n) as host float32: :func:`.algorithms.art` on the current GPU, the
    same updates in the same row order (equal up to float32 rounding). ``sinograms`` and
    ``x0`` may be numpy or cupy arrays; raises GPUUnavailable before any work without a GPU."""
    cp = require_cupy()
    sinograms = cp.asarray(sinograms, dtype=cp.float32)
    nz = sinograms.shape[0]
    b = sinograms.reshape(nz, -1)
    if b.shape[1] != A.shape[0]:
        raise ValueError(f"sinograms {sinograms.shape[1:]} do not match the matrix {A.shape}")
    matrix = device_system_matrix(A)
    x = cp.zeros((nz, matrix.n_store), dtype=cp.float32)
    if x0 is not None:
        x[:, matrix.position] = cp.asarray(x0, dtype=cp.float32).reshape(nz, -1)
    art_sweeps(matrix, b, x, iterations, beta, positivity, progress)
    n = math.isqrt(A.shape[1])
    return to_host(x[:, matrix.position]).reshape(nz, n, n)
