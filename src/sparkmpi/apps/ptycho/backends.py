"""Array backends of the solver: where the exit waves live and how one pass over them runs.

Every backend holds one rank's frames (measured amplitudes, window positions, exit waves) and
offers the same four steps; object and probe go in and the partial sums come out as host
numpy arrays (complex128/float64), ready for ``MPI_Allreduce``.

* ``cpu``: numba loops fused around scipy.fft's batched FFTs, a chunk of frames at a time so
  the chunk stays in cache; ``threads`` FFT worker threads.
* ``numpy`` / ``cupy``: the same steps as whole-stack array expressions (gather/scatter through
  index arrays), the reference implementation and the GPU path.
"""

from __future__ import annotations

import numpy as np

from sparkmpi.apps.ptycho import kernels

BACKENDS = ("cpu", "numpy", "cupy")


class CPUBackend:
    """numba + scipy.fft on the host."""

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
        makes their first update the identity, as for a fresh start)."""
        amp = np.ascontiguousarray(amp, dtype=np.float32)
        pos = np.ascontiguousarray(pos, dtype=np.int64)
        waves = np.empty(amp.shape, dtype=np.complex64)
        kernels.exit_waves(_c64(probe), _c64(obj), pos, waves)
        if len(self.amp):
            amp = np.concatenate([self.amp, amp])
            pos = np.concatenate([self.pos, pos])
            waves = np.concatenate([self.psi, waves])
        self.amp, self.pos, self.psi = amp, pos, waves
        self.w = self.psi.copy() if self.algorithm == "raar" else self.psi
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


class ArrayBackend:
    """The same steps as array expressions over the whole stack, in ``xp`` (numpy or cupy)."""

    def __init__(self, xp, obj_shape, n: int, algorithm: str):
        self.xp = xp
        self.n = n
        self.algorithm = algorithm
        self.obj_shape = obj_shape
        self.amp = self.index = self.psi = self.phi = None

    def add(self, amp, pos, probe, obj) -> None:
        xp = self.xp
        n = amp.shape[1]
        rows = pos[:, 0, None, None] + np.arange(n)[None, :, None]
        cols = pos[:, 1, None, None] + np.arange(n)[None, None, :]
        index = xp.asarray((rows * self.obj_shape[1] + cols).astype(np.int64))
        amp = xp.asarray(np.ascontiguousarray(amp, dtype=np.float32))
        waves = xp.asarray(_c64(probe))[None] * xp.asarray(_c64(obj)).ravel()[index]
        if self.amp is not None:
            amp = xp.concatenate([self.amp, amp])
            index = xp.concatenate([self.index, index])
            waves = xp.concatenate([self.psi, waves])
        self.amp, self.index, self.psi = amp, index, waves
        self.phi = self.psi.copy() if self.algorithm == "raar" else self.psi

    def _scatter(self, values, shape, dtype):
        xp = self.xp
        out = xp.zeros(int(np.prod(shape)), dtype=dtype)
        if xp is np:
            np.add.at(out, self.index.ravel(), values.ravel())
        else:
            import cupyx

            cupyx.scatter_add(out, self.index.ravel(), values.ravel())
        return out.reshape(shape)

    def _views(self, obj):
        return self.xp.asarray(_c64(obj)).ravel()[self.index]

    def _host(self, a):
        return a if self.xp is np else self.xp.asnumpy(a)

    def fourier_pass(self, probe, obj, beta: float):
        xp = self.xp
        if self.amp is None:
            return np.zeros(self.obj_shape, dtype=np.complex128), 0.0
        P = xp.asarray(_c64(probe))
        exit_wave = P[None] * self._views(obj)
        if self.algorithm == "dm":
            wave = 2 * exit_wave - self.psi
        else:
            self.psi = beta * self.psi + beta * exit_wave + (1 - 2 * beta) * self.phi
            wave = self.psi
        ft = xp.fft.fft2(wave, norm="ortho")
        a = xp.abs(ft)
        err = float(xp.sum((a - self.amp) ** 2))
        ft = xp.where(a > 1e-30, ft * (self.amp / xp.maximum(a, 1e-30)), self.amp)
        back = xp.fft.ifft2(ft, norm="ortho").astype(xp.complex64)
        if self.algorithm == "dm":
            self.psi = self.psi + back - exit_wave
            target = self.psi
        else:
            self.phi = back
            target = 2 * back - self.psi
        obj_num = self._scatter(xp.conj(P)[None] * target, self.obj_shape, xp.complex128)
        return self._host(obj_num), err

    def illumination(self, probe) -> np.ndarray:
        xp = self.xp
        if self.index is None:
            return np.zeros(self.obj_shape, dtype=np.float64)
        weight = xp.abs(xp.asarray(_c64(probe))) ** 2
        full = xp.broadcast_to(weight[None], self.index.shape)
        return self._host(self._scatter(full, self.obj_shape, xp.float64))

    def probe_sums(self, obj):
        xp = self.xp
        if self.amp is None:
            return np.zeros((self.n, self.n), np.complex128), np.zeros((self.n, self.n))
        views = self._views(obj)
        target = self.psi if self.algorithm == "dm" else 2 * self.phi - self.psi
        num = xp.sum(xp.conj(views).astype(xp.complex128) * target, axis=0)
        den = xp.sum(xp.abs(views).astype(xp.float64) ** 2, axis=0)
        return self._host(num), self._host(den)


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
    """An empty backend called ``name`` for one rank's frames; a clear error if it cannot run."""
    if name == "cpu":
        return CPUBackend(obj_shape, n, algorithm, threads)
    if name == "numpy":
        return ArrayBackend(np, obj_shape, n, algorithm)
    if name == "cupy":
        try:
            import cupy
        except ImportError as exc:
            raise RuntimeError(f"backend 'cupy' needs the cupy package: {exc}") from None
        return ArrayBackend(cupy, obj_shape, n, algorithm)
    raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, not {name!r}")
