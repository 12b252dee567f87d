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
def raar_prepare(psi, phi, probe, obj, pos, start, stop, beta, first, buf):
    """ψ_j ← β ψ_j + β P·O_j + (1 - 2β) φ_j (skipped on the first pass); buf = ψ_j."""
    n = probe.shape[0]
    beta = np.float32(beta)
    rest = np.float32(1) - 2 * beta
    for f in range(start, stop):
        y0, x0 = pos[f, 0], pos[f, 1]
        for i in range(n):
            for k in range(n):
                if not first:
                    psi[f, i, k] = (
                        beta * psi[f, i, k]
                        + beta * probe[i, k] * obj[y0 + i, x0 + k]
                        + rest * phi[f, i, k]
                    )
                buf[f - start, i, k] = psi[f, i, k]


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
def raar_finish(psi, phi, probe, pos, start, stop, buf, obj_num):
    """φ_j = Π_F(ψ_j), and obj_num += conj(P) (2φ_j - ψ_j) at frame j's window."""
    n = probe.shape[0]
    for f in range(start, stop):
        y0, x0 = pos[f, 0], pos[f, 1]
        for i in range(n):
            for k in range(n):
                z = buf[f - start, i, k]
                phi[f, i, k] = z
                obj_num[y0 + i, x0 + k] += np.conj(probe[i, k]) * (2 * z - psi[f, i, k])


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
def probe_sums(a, b, ca, cb, obj, pos, probe_num, probe_den):
    """probe_num += conj(O_j) w_j and probe_den += |O_j|² with w_j = ca·a_j + cb·b_j."""
    n = probe_num.shape[0]
    for f in range(pos.shape[0]):
        y0, x0 = pos[f, 0], pos[f, 1]
        for i in range(n):
            for k in range(n):
                o = obj[y0 + i, x0 + k]
                probe_num[i, k] += np.conj(o) * (ca * a[f, i, k] + cb * b[f, i, k])
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
