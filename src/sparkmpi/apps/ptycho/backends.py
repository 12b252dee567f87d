"""Array backends of the solver: where the exit waves live and how one pass over them runs.

Every backend holds one rank's frames (measured amplitudes, window positions, exit waves) and
offers the same four steps; object and probe go in and the partial sums (of the object and
probe updates, and the squared misfit) come out in the backend's array module, ready for
``MPI_Allreduce``.

* ``cpu``: numba loops fused around scipy.fft's batched FFTs, a chunk of frames at a time so
  the chunk stays in cache; ``threads`` FFT worker threads.
* ``numpy`` / ``cupy``: :class:`StackBackend`, the whole stack at once through per-element
  steps: numpy array expressions (the reference) or fused CUDA kernels (the GPU path), where
  object, probe and update sums stay on the device.

``xp`` of a backend is the array module its object, probe and sums live in.
"""

from __future__ import annotations

import numpy as np

from sparkmpi.apps.ptycho import kernels

BACKENDS = ("cpu", "numpy", "cupy")


class CPUBackend:
    """numba + scipy.fft on the host."""

    xp = np

    def __init__(self, obj_shape, n: int, algorithm: str, threads: int = 1, chunk: int = 16):
        self.obj_shape = obj_shape
        self.n = n
        self.algorithm = algorithm
        self.threads = threads
        self.chunk = chunk
        self.amp = np.zeros((0, n, n), dtype=np.float32)
        self.pos = np.zeros((0, 2), dtype=np.int64)
        self.psi = self.w = np.zeros((0, n, n), dtype=np.complex64)

    def add(self, amp, pos, probe, obj) -> None:
        """Adds frames whose exit waves start as P·O_j (for RAAR also w_j = P·O_j, which
        makes their first update the identity, as for a fresh start); the frames already
        held keep their ψ and w."""
        amp = np.ascontiguousarray(amp, dtype=np.float32)
        pos = np.ascontiguousarray(pos, dtype=np.int64)
        waves = np.empty(amp.shape, dtype=np.complex64)
        kernels.exit_waves(_c64(probe), _c64(obj), pos, waves)
        fresh = waves.copy() if self.algorithm == "raar" else None
        if len(self.amp):
            amp = np.concatenate([self.amp, amp])
            pos = np.concatenate([self.pos, pos])
            waves = np.concatenate([self.psi, waves])
            if fresh is not None:
                fresh = np.concatenate([self.w, fresh])  # earlier frames keep their state
        self.amp, self.pos, self.psi = amp, pos, waves
        self.w = self.psi if fresh is None else fresh
        self.buf = np.empty((min(self.chunk, max(len(amp), 1)), *amp.shape[1:]), np.complex64)

    def fourier_pass(self, probe, obj, beta: float) -> tuple[np.ndarray, float]:
        """One Fourier-constraint pass; the object numerator of the next overlap projection
        and the summed squared amplitude misfit."""
        import scipy.fft

        probe, obj = _c64(probe), _c64(obj)
        obj_num = np.zeros(self.obj_shape, dtype=np.complex128)
        err = 0.0
        for start in range(0, len(self.amp), self.chunk):
            stop = min(start + self.chunk, len(self.amp))
            buf = self.buf[: stop - start]
            if self.algorithm == "dm":
                kernels.dm_prepare(self.psi, probe, obj, self.pos, start, stop, buf)
            else:
                kernels.raar_prepare(self.psi, self.w, probe, obj, self.pos, start, stop, beta, buf)
            ft = scipy.fft.fft2(buf, norm="ortho", overwrite_x=True, workers=self.threads)
            err += kernels.modulus(ft, self.amp, start)
            back = scipy.fft.ifft2(ft, norm="ortho", overwrite_x=True, workers=self.threads)
            if self.algorithm == "dm":
                kernels.dm_finish(self.psi, probe, obj, self.pos, start, stop, back, obj_num)
            else:
                kernels.raar_finish(self.psi, self.w, probe, self.pos, start, stop, back, obj_num)
        return obj_num, err

    def illumination(self, probe) -> np.ndarray:
        """Σ_j |P|² over each frame's window (the object update's denominator)."""
        obj_den = np.zeros(self.obj_shape, dtype=np.float64)
        kernels.illumination(_c64(probe), self.pos, obj_den)
        return obj_den

    def probe_sums(self, obj) -> tuple[np.ndarray, np.ndarray]:
        """Σ_j conj(O_j) w_j and Σ_j |O_j|² (the probe update), w_j the overlap target."""
        num = np.zeros((self.n, self.n), np.complex128)
        den = np.zeros((self.n, self.n), np.float64)
        target = self.psi if self.algorithm == "dm" else self.w  # the overlap target
        kernels.probe_sums(target, _c64(obj), self.pos, num, den)
        return num, den


class StackBackend:
    """The whole stack of frames as arrays of ``ops.xp`` (numpy or cupy), advanced by the
    per-element steps of ``ops`` (:class:`.array_ops.NumpyOps` or :class:`.gpu.CupyOps`).

    The same formulation as :class:`CPUBackend` (ψ and w = 2φ - ψ), so all backends compute
    the same iterates. Object, probe and the sums it returns stay in ``ops.xp``.
    """

    def __init__(self, ops, obj_shape, n: int, algorithm: str):
        self.ops = ops
        self.xp = ops.xp
        self.obj_shape = obj_shape
        self.n = n
        self.algorithm = algorithm
        self.pos = np.zeros((0, 2), dtype=np.int64)
        self.amp = self.psi = self.w = self.buf = self.geometry = None

    def add(self, amp, pos, probe, obj) -> None:
        """Adds frames whose exit waves start as P·O_j (for RAAR also w_j = P·O_j)."""
        xp, ops = self.xp, self.ops
        self.pos = np.concatenate([self.pos, np.asarray(pos, dtype=np.int64).reshape(-1, 2)])
        geometry = ops.geometry(np.asarray(pos, dtype=np.int64), self.n, self.obj_shape[1])
        amp = xp.asarray(np.ascontiguousarray(amp, dtype=np.float32))
        waves = ops.exit_waves(self.asarray(probe), self.asarray(obj), geometry)
        fresh = waves.copy() if self.algorithm == "raar" else None
        if self.amp is not None:
            amp = xp.concatenate([self.amp, amp])
            waves = xp.concatenate([self.psi, waves])
            if fresh is not None:
                fresh = xp.concatenate([self.w, fresh])  # earlier frames keep their state
        self.geometry = ops.geometry(self.pos, self.n, self.obj_shape[1])
        self.amp, self.psi, self.w = amp, waves, fresh
        self.buf = xp.empty_like(self.psi)

    def asarray(self, a):
        """``a`` as a contiguous complex64 array of this backend."""
        return self.xp.ascontiguousarray(self.xp.asarray(a, dtype=np.complex64))

    def fourier_pass(self, probe, obj, beta: float):
        """As :meth:`CPUBackend.fourier_pass`, with the error left on the device."""
        xp, ops = self.xp, self.ops
        obj_num = xp.zeros(self.obj_shape, dtype=np.complex64)
        if self.amp is None:
            return obj_num, 0.0
        probe, obj = self.asarray(probe), self.asarray(obj)
        if self.algorithm == "dm":
            ops.dm_prepare(self.psi, probe, obj, self.geometry, self.buf)
        else:
            ops.raar_prepare(self.psi, self.w, probe, obj, self.geometry, beta, self.buf)
        ops.fft(self.buf, forward=True)
        err = ops.modulus(self.buf, self.amp)
        ops.fft(self.buf, forward=False)
        if self.algorithm == "dm":
            ops.dm_finish(self.psi, probe, obj, self.geometry, self.buf, obj_num)
        else:
            ops.raar_finish(self.psi, self.w, probe, self.geometry, self.buf, obj_num)
        return obj_num, err

    def illumination(self, probe):
        """Σ_j |P|² over each frame's window."""
        obj_den = self.xp.zeros(self.obj_shape, dtype=np.float32)
        if self.amp is not None:
            self.ops.illumination(self.asarray(probe), self.geometry, obj_den)
        return obj_den

    def probe_sums(self, obj):
        """Σ_j conj(O_j) w_j and Σ_j |O_j|²."""
        xp = self.xp
        if self.amp is None:
            n = self.n
            return xp.zeros((n, n), np.complex64), xp.zeros((n, n), np.float32)
        target = self.psi if self.algorithm == "dm" else self.w
        return self.ops.probe_sums(target, self.asarray(obj), self.geometry)


def warm_up(name: str, algorithm: str) -> None:
    """Loads (or compiles) the backend's kernels on a tiny problem, so timings of the first
    real iteration do not include it."""
    if name != "cpu":
        return
    backend = CPUBackend((8, 8), 8, algorithm)
    probe, obj = np.ones((8, 8)), np.ones((8, 8))
    backend.add(np.ones((1, 8, 8)), np.zeros((1, 2)), probe, obj)
    backend.fourier_pass(probe, obj, 0.5)
    backend.illumination(probe)
    backend.probe_sums(obj)


def _c64(a) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.complex64)


def make_backend(name: str, obj_shape, n: int, algorithm: str, threads: int = 1):
    """An empty backend called ``name`` for one rank's frames; for ``cupy``
    :class:`~sparkmpi.apps.cuda.GPUUnavailable` (one line) when no GPU can run it."""
    if name == "cpu":
        return CPUBackend(obj_shape, n, algorithm, threads)
    if name == "numpy":
        from sparkmpi.apps.ptycho.array_ops import NumpyOps

        return StackBackend(NumpyOps(), obj_shape, n, algorithm)
    if name == "cupy":
        from sparkmpi.apps.ptycho.gpu import CupyOps

        return StackBackend(CupyOps(), obj_shape, n, algorithm)
    raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, not {name!r}")
