"""Simulated far-field ptychography: a focused probe scanned over a complex test object."""

from __future__ import annotations

import numpy as np

from sparkmpi.apps.ptycho.scan import Scan


def make_probe(n: int = 128, radius: float | None = None, curvature: float = 1.0) -> np.ndarray:
    """A focused-beam probe (n, n) complex64 of unit power: a soft-edged disc of ``radius``
    pixels (n/5 by default) with a quadratic phase of ``curvature`` x π at its edge."""
    radius = n / 5 if radius is None else radius
    y, x = np.mgrid[:n, :n] - (n - 1) / 2
    r = np.hypot(y, x)
    amplitude = 0.5 * (1 - np.tanh((r - radius) / 2.0))
    probe = amplitude * np.exp(1j * np.pi * curvature * (r / radius) ** 2)
    return (probe / np.sqrt(np.sum(np.abs(probe) ** 2))).astype(np.complex64)


def _smooth_blobs(shape, count: int, rng) -> np.ndarray:
    y, x = np.mgrid[: shape[0], : shape[1]]
    field = np.zeros(shape)
    for _ in range(count):
        cy, cx = rng.uniform(0, shape[0]), rng.uniform(0, shape[1])
        width = rng.uniform(4, 20)
        field += rng.uniform(0.3, 1) * np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * width**2))
    return field / max(field.max(), 1e-12)


def make_object(shape: tuple[int, int], seed: int = 0, max_phase: float = 0.8) -> np.ndarray:
    """A complex64 test object: amplitude 0.7 to 1 from smooth blobs, phase up to ``max_phase``
    radians from a Siemens star plus blobs, so both show structure at every scale."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[: shape[0], : shape[1]]
    cy, cx = (shape[0] - 1) / 2, (shape[1] - 1) / 2
    angle = np.arctan2(y - cy, x - cx)
    radius = np.hypot(y - cy, x - cx)
    star = (np.sin(18 * angle) > 0) * (radius < 0.35 * min(shape))
    phase = max_phase * (0.6 * star + 0.4 * _smooth_blobs(shape, 30, rng))
    amplitude = 1 - 0.3 * _smooth_blobs(shape, 30, rng)
    return (amplitude * np.exp(1j * phase)).astype(np.complex64)


def fermat_spiral(n_points: int, step: float) -> np.ndarray:
    """(n_points, 2) positions on a Fermat spiral whose points are ``step`` pixels apart on
    average (each holds an area of step²)."""
    k = np.arange(n_points)
    r = step * np.sqrt(k / np.pi)
    theta = k * np.deg2rad(137.50776)
    return np.column_stack([r * np.sin(theta), r * np.cos(theta)])


def raster(n_points: int, step: float) -> np.ndarray:
    """(n_points, 2) positions on a square raster with ``step`` pixels between points."""
    side = int(np.ceil(np.sqrt(n_points)))
    y, x = np.divmod(np.arange(n_points), side)
    return np.column_stack([y, x]).astype(np.float64) * step


def simulate(
    frames: int = 512,
    n: int = 128,
    *,
    pattern: str = "spiral",
    overlap: float = 0.7,
    photons: float = 1e6,
    noise: bool = False,
    seed: int = 0,
) -> Scan:
    """A simulated scan: ``frames`` diffraction patterns of n x n from a probe of diameter
    2n/5 moved so neighbouring illuminations overlap by ``overlap`` (of the diameter),
    ``photons`` per frame on average, Poisson-sampled when ``noise``."""
    if not 0 <= overlap < 1 or frames < 1 or n < 8 or photons <= 0:
        raise ValueError("need frames >= 1, n >= 8, photons > 0 and 0 <= overlap < 1")
    probe = make_probe(n)
    diameter = 2 * n / 5
    step = (1 - overlap) * diameter
    if pattern not in ("spiral", "raster"):
        raise ValueError(f"pattern must be spiral or raster, not {pattern!r}")
    points = fermat_spiral(frames, step) if pattern == "spiral" else raster(frames, step)
    margin = 4
    positions = np.rint(points - points.min(axis=0) + margin)
    shape = tuple(int(v) for v in positions.max(axis=0) + n)
    obj = make_object(shape, seed)
    probe = probe * np.float32(np.sqrt(photons))
    corners = positions.astype(np.int64)
    intensities = np.empty((frames, n, n), dtype=np.float32)
    for j, (y0, x0) in enumerate(corners):
        wave = probe * obj[y0 : y0 + n, x0 : x0 + n]
        intensities[j] = np.abs(np.fft.fftshift(np.fft.fft2(wave, norm="ortho"))) ** 2
    if noise:
        intensities = np.random.default_rng(seed + 1).poisson(intensities).astype(np.float32)
    return Scan(
        intensities,
        positions,
        probe,
        truth_object=obj,
        truth_probe=probe,
        source=f"simulated {pattern} scan, seed {seed}" + (", Poisson noise" if noise else ""),
    )
