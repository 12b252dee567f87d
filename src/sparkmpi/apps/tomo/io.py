"""Tilt series: the in-memory form, and the one entry point that reads any supported file
(multi-page TIFF stacks, :mod:`.tiff`; Data Exchange HDF5 scans, :mod:`.dxchange`) whole or
a range of detector rows at a time."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sparkmpi.files import InputFileError, reason

TIFF_SUFFIXES = (".tif", ".tiff")
HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf")


class TomoInputError(InputFileError):
    """A tilt series or scan that cannot be used; the message is one line naming the file."""


@dataclass
class TiltSeries:
    """Projections (n_angles, n_rows, n_cols) float32 with their tilt angles in degrees.

    After construction ``projections`` is a finite float32 3-D array and ``angles_deg`` a finite
    float64 vector with one angle per projection; otherwise :class:`TomoInputError` is raised.
    """

    projections: np.ndarray
    angles_deg: np.ndarray
    source: str = ""

    def __post_init__(self) -> None:
        name = self.source or "tilt series"
        try:
            self.projections = np.asarray(self.projections, dtype=np.float32)
            self.angles_deg = np.asarray(self.angles_deg, dtype=np.float64).reshape(-1)
        except (TypeError, ValueError) as exc:
            raise TomoInputError(f"{name}: not numeric data ({reason(exc)})") from None
        if self.projections.ndim != 3 or 0 in self.projections.shape:
            raise TomoInputError(
                f"{name}: projections must be a non-empty (n_angles, n_rows, n_cols) stack, "
                f"got shape {self.projections.shape}"
            )
        if len(self.angles_deg) != self.projections.shape[0]:
            raise TomoInputError(
                f"{name}: {self.projections.shape[0]} projections but "
                f"{len(self.angles_deg)} tilt angles"
            )
        if not np.isfinite(self.angles_deg).all():
            raise TomoInputError(f"{name}: tilt angles are not all finite")
        if not np.isfinite(self.projections).all():
            raise TomoInputError(f"{name}: projections contain NaN or infinite values")

    def sinogram(self, row: int) -> np.ndarray:
        """Detector row ``row`` over all angles: a contiguous float32 (n_angles, n_cols) copy."""
        return np.array(self.projections[:, row, :], dtype=np.float32, order="C")


def check_exists(path: Path) -> None:
    """Raises :class:`TomoInputError` unless ``path`` is a file."""
    if not path.is_file():
        raise TomoInputError(f"{path}: no such file")


@dataclass(frozen=True)
class SeriesLayout:
    """A tilt-series file as its headers describe it, checked, without its pixel data: enough
    to plan which detector rows each task reads (:func:`read_rows`)."""

    path: str
    format: str  # "tiff" or "dxchange"
    shape: tuple[int, int, int]  # (n_angles, n_rows, n_cols)
    angles_deg: tuple[float, ...]
    source: str
    scale: float = 1.0  # TIFF samples -> projections: sample * scale + offset
    offset: float = 0.0


def series_of(layout: SeriesLayout) -> TiltSeries:
    """The whole tilt series ``layout`` describes, read."""
    projections = read_rows(layout, 0, layout.shape[1])
    return TiltSeries(projections, np.asarray(layout.angles_deg), layout.source)


def inspect_series(
    path: str | os.PathLike, angles_deg: np.ndarray | list[float] | None = None
) -> SeriesLayout:
    """The layout of a TIFF stack (``.tif``/``.tiff``) or Data Exchange HDF5 file
    (``.h5``/``.hdf5``/``.hdf``) from its headers, checked as :func:`read_series` checks;
    ``angles_deg``, when given, overrides the file's angles."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in TIFF_SUFFIXES:
        from sparkmpi.apps.tomo.tiff import tiff_layout

        check_exists(path)
        return tiff_layout(path, angles_deg)
    if suffix in HDF5_SUFFIXES:
        from sparkmpi.apps.tomo.dxchange import dxchange_layout

        layout = dxchange_layout(path)
        if angles_deg is None:
            return layout
        angles = tuple(float(a) for a in np.asarray(angles_deg, dtype=np.float64).reshape(-1))
        if len(angles) != layout.shape[0]:
            raise TomoInputError(
                f"{path}: {layout.shape[0]} projections but {len(angles)} tilt angles (--angles)"
            )
        return dataclasses.replace(layout, angles_deg=angles)
    raise TomoInputError(
        f"{path}: unknown tilt-series format (expected .tif/.tiff or Data Exchange .h5)"
    )


def read_rows(layout: SeriesLayout, first: int, stop: int) -> np.ndarray:
    """Detector rows first..stop-1 of every projection, (n_angles, stop - first, n_cols)
    float32; for a Data Exchange scan the corrected line integrals
    (:func:`.dxchange.line_integrals`). Reads only those rows where the format allows."""
    from sparkmpi.apps.tomo.dxchange import dxchange_rows, line_integrals
    from sparkmpi.apps.tomo.tiff import read_tiff_rows

    if layout.format == "tiff":
        return read_tiff_rows(layout, first, stop)
    return line_integrals(*dxchange_rows(Path(layout.path), first, stop))


def read_series(
    path: str | os.PathLike, angles_deg: np.ndarray | list[float] | None = None
) -> TiltSeries:
    """The tilt series in a TIFF stack (``.tif``/``.tiff``) or a Data Exchange HDF5 file
    (``.h5``/``.hdf5``/``.hdf``); ``angles_deg``, when given, overrides the file's angles."""
    return series_of(inspect_series(path, angles_deg))
