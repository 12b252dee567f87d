"""Synthetic TEM data: a nanoparticle phantom and its tilt series, so anyone can run the
seed paper's case (256 x 256 x 74 projections over ±73° in 2° steps)."""

from __future__ import annotations

import numpy as np

from sparkmpi.apps.tomo.projector import project, system_matrix

MATRIX_DENSITY = 0.25
PARTICLE_DENSITY = 1.0


def blobs_phantom(shape: tuple[int, int, int], n_blobs: int = 40, seed: int = 0) -> np.ndarray:
    """A float32 volume (nz, ny, nx): dense spherical nanoparticles of several sizes inside a
    flat ellipsoidal support (thin along y, the beam direction at 0° tilt), like a TEM
    specimen; zero outside. The same arguments give the same volume."""
    nz, ny, nx = shape
    if nz < 1 or min(ny, nx) < 4:
        raise ValueError(f"phantom shape needs nz >= 1 and slices of at least 4x4, not {shape}")
    rng = np.random.default_rng(seed)
    z, y, x = (np.arange(s, dtype=np.float32) - (s - 1) / 2 for s in shape)
    semi = (0.45 * nz, 0.22 * ny, 0.42 * nx)
    support = (
        (z[:, None, None] / semi[0]) ** 2
        + (y[None, :, None] / semi[1]) ** 2
        + (x[None, None, :] / semi[2]) ** 2
    ) <= 1
    volume = np.where(support, np.float32(MATRIX_DENSITY), np.float32(0))
    scale = min(ny, nx)
    for _ in range(n_blobs):
        radius = rng.uniform(0.02, 0.06) * scale
        # centres well inside the support so particles stay in it
        u = rng.uniform(-1, 1, 3)
        u *= rng.uniform(0, 0.8) / max(np.linalg.norm(u), 1e-9)
        centre = (u[0] * semi[0], u[1] * max(semi[1] - radius, 0.0), u[2] * semi[2])
        lo = [max(int(c + (s - 1) / 2 - radius) - 1, 0) for c, s in zip(centre, shape, strict=True)]
        hi = [min(int(c + (s - 1) / 2 + radius) + 2, s) for c, s in zip(centre, shape, strict=True)]
        box = np.s_[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
        r2 = (
            (z[box[0], None, None] - centre[0]) ** 2
            + (y[None, box[1], None] - centre[1]) ** 2
            + (x[None, None, box[2]] - centre[2]) ** 2
        )
        volume[box] = np.where(r2 <= radius**2, np.float32(PARTICLE_DENSITY), volume[box])
    return volume


def tilt_angles(max_deg: float = 73.0, step_deg: float = 2.0) -> np.ndarray:
    """Tilt angles ``step_deg`` apart, symmetric about 0 and never beyond ``±max_deg`` (the
    most that fit: -73..+73 in 2° steps by default, 74 angles; -70..+70 for a 10° step)."""
    if max_deg < 0 or step_deg <= 0:
        raise ValueError("tilt range must be >= 0 and the step > 0 degrees")
    steps = int(np.floor(2 * max_deg / step_deg + 1e-9))
    return -steps * step_deg / 2 + step_deg * np.arange(steps + 1, dtype=np.float64)


def simulate_tilt_series(volume: np.ndarray, angles_deg: np.ndarray) -> np.ndarray:
    """Noise-free projections (n_angles, nz, nx) of ``volume`` (nz, n, n) about the z axis, in
    the geometry of :func:`~sparkmpi.apps.tomo.projector.system_matrix`."""
    _, ny, nx = volume.shape
    if ny != nx:
        raise ValueError(f"slices must be square to simulate a tilt series, not {ny}x{nx}")
    A = system_matrix(nx, tuple(float(a) for a in angles_deg), nx)
    return np.ascontiguousarray(project(volume, A).transpose(1, 0, 2))
