"""Fused per-frame loops of the CPU backend (numba), between the batched FFTs.

Each kernel makes one pass over a range of frames, reading the object through each frame's
window, so that the exit waves are touched as few times per iteration as the algorithm allows.
Frames ``start..stop`` of the rank's stack map to rows ``0..stop-start`` of the FFT buffer.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, fastmath=True)
def dm_prepare(psi, probe, obj, pos, start, stop, buf):
    """buf = 2 P·O_j - ψ_j (the difference map's reflected overlap projection)."""
    n = probe.shape[0]
    for f in range(start, stop):
        y0, x0 = pos[f, 0], pos[f, 1]
        for i in range(n):
            for k in range(n):
                buf[f - start, i, k] = 2 * probe[i, k] * obj[y0 + i, x0 + k] - psi[f, i, k]


@numba.njit(cache=True, fastmath=True)
def raar_prepare(psi, w, probe, obj, pos, start, stop, beta, buf):
    """ψ_j <- ψ_j/2 + β P·O_j + (1/2 - β) w_j; buf = ψ_j.

    With w = 2φ - ψ (φ the last Fourier projection) this is RAAR's
    β ψ + β P·O + (1 - 2β) φ, stored so the probe pass reads w alone."""
    n = probe.shape[0]
    beta = np.float32(beta)
    half = np.float32(0.5)
    rest = half - beta
    for f in range(start, stop):
        y0, x0 = pos[f, 0], pos[f, 1]
        for i in range(n):
            for k in range(n):
                z = (
                    half * psi[f, i, k]
                    + beta * probe[i, k] * obj[y0 + i, x0 + k]
                    + rest * w[f, i, k]
                )
                psi[f, i, k] = z
                buf[f - start, i, k] = z


@numba.njit(cache=True, fastmath=True)
def modulus(buf, amp, start):
    """Replaces the Fourier modulus of buf by the measured amplitudes of frames start..;
    returns the summed squared amplitude misfit."""
    err = 0.0
    tiny = np.float32(1e-30)
    for f in range(buf.shape[0]):
        frame_err = np.float32(0)
        for i in range(buf.shape[1]):
            for k in range(buf.shape[2]):
                z = buf[f, i, k]
                a = np.sqrt(z.real * z.real + z.imag * z.imag)
                target = amp[start + f, i, k]
                frame_err += (a - target) * (a - target)
                scale = target / max(a, tiny)
                buf[f, i, k] = z * scale if a > tiny else target
        err += frame_err
    return err


@numba.njit(cache=True, fastmath=True)
def dm_finish(psi, probe, obj, pos, start, stop, buf, obj_num):
    """ψ_j ← ψ_j + Π_F(2P·O_j - ψ_j) - P·O_j, and obj_num += conj(P) ψ_j at frame j's window."""
    n = probe.shape[0]
    for f in range(start, stop):
        y0, x0 = pos[f, 0], pos[f, 1]
        for i in range(n):
            for k in range(n):
                p = probe[i, k]
                new = psi[f, i, k] + buf[f - start, i, k] - p * obj[y0 + i, x0 + k]
                psi[f, i, k] = new
                obj_num[y0 + i, x0 + k] += np.conj(p) * new


@numba.njit(cache=True, fastmath=True)
def raar_finish(psi, w, probe, pos, start, stop, buf, obj_num):
    """w_j = 2 Π_F(ψ_j) - ψ_j, and obj_num += conj(P) w_j at frame j's window."""
    n = probe.shape[0]
    for f in range(start, stop):
        y0, x0 = pos[f, 0], pos[f, 1]
        for i in range(n):
            for k in range(n):
                z = 2 * buf[f - start, i, k] - psi[f, i, k]
                w[f, i, k] = z
                obj_num[y0 + i, x0 + k] += np.conj(probe[i, k]) * z


@numba.njit(cache=True, fastmath=True)
def illumination(probe, pos, obj_den):
    """obj_den += |P|² at every frame's window."""
    n = probe.shape[0]
    for f in range(pos.shape[0]):
        y0, x0 = pos[f, 0], pos[f, 1]
        for i in range(n):
            for k in range(n):
                p = probe[i, k]
                obj_den[y0 + i, x0 + k] += p.real * p.real + p.imag * p.imag


@numba.njit(cache=True, fastmath=True)
def probe_sums(target, obj, pos, probe_num, probe_den):
    """probe_num += conj(O_j) target_j and probe_den += |O_j|² over every frame."""
    n = probe_num.shape[0]
    for f in range(pos.shape[0]):
        y0, x0 = pos[f, 0], pos[f, 1]
        for i in range(n):
            for k in range(n):
                o = obj[y0 + i, x0 + k]
                probe_num[i, k] += np.conj(o) * target[f, i, k]
                probe_den[i, k] += o.real * o.real + o.imag * o.imag


@numba.njit(cache=True, fastmath=True)
def exit_waves(probe, obj, pos, out):
    """out_j = P·O_j for every frame."""
    n = probe.shape[0]
    for f in range(pos.shape[0]):
        y0, x0 = pos[f, 0], pos[f, 1]
        for i in range(n):
            for k in range(n):
                out[f, i, k] = probe[i, k] * obj[y0 + i, x0 + k]
