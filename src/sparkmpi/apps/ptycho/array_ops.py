"""The per-element steps of the stack backend, as numpy array expressions: the reference that
the GPU kernels (:mod:`.gpu`) implement one thread per element.

A stack holds every frame of the rank: ``psi`` and ``w`` (frames, n, n) complex64, the
measured amplitudes (frames, n, n) float32 in FFT order. ``geometry`` says where each frame's
window lies in the object; here it is the flat object index of every stack element. FFTs are
unnormalised both ways; :meth:`modulus` folds in the 1/n² so that the round trip equals
scipy's ``norm="ortho"`` pair, as in the CPU backend.
"""

from __future__ import annotations

import numpy as np

TINY = np.float32(1e-30)


class NumpyOps:
    """numpy versions of the stack steps (see module doc); every method works in place on its
    output arguments or returns new arrays, exactly as its GPU counterpart."""

    xp = np

    def geometry(self, pos: np.ndarray, n: int, width: int) -> np.ndarray:
        """The flat object index (frames, n, n) of every element of the stack."""
        rows = pos[:, 0, None, None] + np.arange(n)[None, :, None]
        cols = pos[:, 1, None, None] + np.arange(n)[None, None, :]
        return rows * width + cols

    def exit_waves(self, probe, obj, geometry) -> np.ndarray:
        """P·O_j for every frame j."""
        return (probe[None] * obj.ravel()[geometry]).astype(np.complex64)

    def dm_prepare(self, psi, probe, obj, geometry, buf) -> None:
        """buf = 2 P·O_j - ψ_j."""
        buf[...] = 2 * probe[None] * obj.ravel()[geometry] - psi

    def raar_prepare(self, psi, w, probe, obj, geometry, beta: float, buf) -> None:
        """ψ_j ← ψ_j/2 + β P·O_j + (1/2 - β) w_j; buf = ψ_j (see :mod:`.kernels`)."""
        beta = np.float32(beta)
        psi[...] = 0.5 * psi + beta * probe[None] * obj.ravel()[geometry] + (0.5 - beta) * w
        buf[...] = psi

    def fft(self, buf, forward: bool) -> None:
        """Unnormalised 2-D FFT of every frame, in place."""
        n2 = buf.shape[-1] * buf.shape[-2]
        buf[...] = np.fft.fft2(buf) if forward else np.fft.ifft2(buf) * n2

    def modulus(self, buf, amp) -> float:
        """Replaces the Fourier modulus of the unnormalised spectra in buf by the measured
        amplitudes (scaled so the unnormalised inverse gives the ortho round trip); returns
        the summed squared misfit of the ortho-normalised amplitudes."""
        inv_n = np.float32(1 / buf.shape[-1])
        a = np.abs(buf) * inv_n
        err = float(np.sum(((a - amp) ** 2).astype(np.float64)))
        safe = np.maximum(a, TINY)
        buf[...] = np.where(a > TINY, buf * (amp / safe * inv_n * inv_n), amp * inv_n)
        return err

    def dm_finish(self, psi, probe, obj, geometry, buf, obj_num) -> None:
        """ψ_j ← ψ_j + buf_j - P·O_j; obj_num += conj(P) ψ_j at each window."""
        psi += buf - probe[None] * obj.ravel()[geometry]
        self._scatter(obj_num, geometry, np.conj(probe)[None] * psi)

    def raar_finish(self, psi, w, probe, geometry, buf, obj_num) -> None:
        """w_j = 2 buf_j - ψ_j; obj_num += conj(P) w_j at each window."""
        w[...] = 2 * buf - psi
        self._scatter(obj_num, geometry, np.conj(probe)[None] * w)

    def illumination(self, probe, geometry, obj_den) -> None:
        """obj_den += |P|² at every window."""
        weight = (probe.real**2 + probe.imag**2).astype(np.float32)
        self._scatter(obj_den, geometry, np.broadcast_to(weight[None], geometry.shape))

    def probe_sums(self, target, obj, geometry) -> tuple[np.ndarray, np.ndarray]:
        """Σ_j conj(O_j) target_j and Σ_j |O_j|² over the frames."""
        views = obj.ravel()[geometry]
        num = np.sum(np.conj(views) * target, axis=0, dtype=np.complex64)
        den = np.sum(views.real**2 + views.imag**2, axis=0, dtype=np.float32)
        return num, den

    @staticmethod
    def _scatter(out, geometry, values) -> None:
        np.add.at(out.reshape(-1), geometry.reshape(-1), values.reshape(-1))
