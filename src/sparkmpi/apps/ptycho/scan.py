"""A ptychographic scan: diffraction frames, where each was taken, the probe and the geometry."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PLANCK_EV_M = 1.23984198e-6  # h c in eV·m


@dataclass
class Scan:
    """Far-field ptychography data.

    ``intensities`` (frames, n, n) float32 photon counts, zero frequency at the centre (as a
    detector records them); ``positions`` (frames, 2) float64 (y, x) of each frame's window
    in object pixels, non-negative; ``probe`` (n, n) complex64 initial illumination, scaled
    so its power is the frames' mean photon count. ``truth_object``/``truth_probe`` are set
    for simulations.
    """

    intensities: np.ndarray
    positions: np.ndarray
    probe: np.ndarray
    energy_ev: float = 8000.0
    distance_m: float = 1.0
    pixel_size_m: float = 55e-6
    truth_object: np.ndarray | None = None
    truth_probe: np.ndarray | None = None
    source: str = ""

    def __post_init__(self) -> None:
        self.intensities = np.asarray(self.intensities, dtype=np.float32)
        self.positions = np.asarray(self.positions, dtype=np.float64)
        self.probe = np.asarray(self.probe, dtype=np.complex64)
        if self.intensities.ndim != 3 or self.intensities.shape[1] != self.intensities.shape[2]:
            raise ValueError(f"frames must be (n_frames, n, n), not {self.intensities.shape}")
        if self.positions.shape != (len(self.intensities), 2):
            raise ValueError(
                f"{len(self.intensities)} frames but positions of shape {self.positions.shape}"
            )
        if self.probe.shape != self.intensities.shape[1:]:
            raise ValueError(f"probe {self.probe.shape} does not match the frames")
        if (self.positions < 0).any():
            raise ValueError("frame positions must be non-negative object pixels")

    @property
    def frame_size(self) -> int:
        return self.intensities.shape[1]

    @property
    def object_pixel_m(self) -> float:
        """The object-plane pixel size of this scan's far-field geometry."""
        return object_pixel_m(self.energy_ev, self.distance_m, self.pixel_size_m, self.frame_size)

    def pixel_positions(self) -> np.ndarray:
        """Window corners rounded to whole object pixels, int64 (frames, 2)."""
        return np.rint(self.positions).astype(np.int64)

    def object_shape(self) -> tuple[int, int]:
        """The smallest object array that holds every frame's window."""
        corner = self.pixel_positions().max(axis=0) + self.frame_size
        return int(corner[0]), int(corner[1])


def object_pixel_m(energy_ev: float, distance_m: float, pixel_size_m: float, n: int) -> float:
    """λ z / (n · detector pixel): the object-plane pixel of an n x n far-field frame."""
    return PLANCK_EV_M / energy_ev * distance_m / (n * pixel_size_m)


def amplitudes(intensities: np.ndarray) -> np.ndarray:
    """Measured Fourier amplitudes in FFT order (zero frequency first), float32."""
    clipped = np.maximum(np.asarray(intensities, dtype=np.float32), 0)
    return np.fft.ifftshift(np.sqrt(clipped), axes=(-2, -1)).astype(np.float32)
