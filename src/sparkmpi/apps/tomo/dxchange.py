"""Data Exchange HDF5 scans (APS): projections of counts with white and dark images, read
whole or a range of detector rows at a time, and corrected into line integrals."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from sparkmpi.apps.tomo.io import SeriesLayout, TiltSeries, TomoInputError, check_exists, series_of
from sparkmpi.files import reason

_DXCHANGE = ("data", "data_white", "data_dark", "theta")
_MIN_TRANSMISSION = 1e-6


def read_dxchange(path: str | os.PathLike) -> TiltSeries:
    """The flat- and dark-corrected line integrals ``-log((data - dark) / (white - dark))`` of a
    Data Exchange HDF5 scan, with angles from ``/exchange/theta`` (degrees).

    The result is finite: transmissions are clipped to a small positive minimum first. A file
    that is not HDF5, lacks a dataset or has inconsistent shapes raises :class:`TomoInputError`.
    """
    return series_of(dxchange_layout(Path(path)))


@contextmanager
def _open_dxchange(path: Path):
    import h5py

    check_exists(path)
    try:
        f = h5py.File(path, "r")
    except Exception as exc:
        raise TomoInputError(f"{path}: not a readable HDF5 file ({reason(exc)})") from None
    with f:
        for name in _DXCHANGE:
            if not isinstance(f.get(f"/exchange/{name}"), h5py.Dataset):
                raise TomoInputError(f"{path}: missing dataset /exchange/{name}")
        yield f


def _read(path: Path, dataset, selection=()) -> np.ndarray:
    try:
        return dataset[selection]
    except Exception as exc:
        raise TomoInputError(f"{path}: cannot read {dataset.name} ({reason(exc)})") from None


def dxchange_layout(path: Path) -> SeriesLayout:
    with _open_dxchange(path) as f:
        data = f["/exchange/data"]
        if data.ndim != 3:
            raise TomoInputError(f"{path}: /exchange/data must be 3-D, got shape {data.shape}")
        for name in ("data_white", "data_dark"):
            shape = f[f"/exchange/{name}"].shape
            shape = (1, *shape) if len(shape) == 2 else shape
            if len(shape) != 3 or shape[1:] != data.shape[1:] or shape[0] == 0:
                raise TomoInputError(
                    f"{path}: /exchange/{name} has shape {shape}, "
                    f"expected (k, {data.shape[1]}, {data.shape[2]})"
                )
        theta = np.asarray(_read(path, f["/exchange/theta"]), dtype=np.float64).reshape(-1)
        if len(theta) != len(data):
            raise TomoInputError(
                f"{path}: /exchange/data has {len(data)} projections but /exchange/theta "
                f"has {len(theta)} angles"
            )
        return SeriesLayout(str(path), "dxchange", data.shape, tuple(theta), path.name)


def dxchange_rows(path: Path, first: int, stop: int) -> tuple[np.ndarray, ...]:
    """Detector rows first..stop-1 of the projections (as stored), and of the mean white
    and dark images (float32)."""
    with _open_dxchange(path) as f:
        data = _read(path, f["/exchange/data"], np.s_[:, first:stop])
        means = []
        for name in ("data_white", "data_dark"):
            flats = f[f"/exchange/{name}"]
            rows = _read(
                path, flats, np.s_[first:stop] if flats.ndim == 2 else np.s_[:, first:stop]
            )
            rows = rows[None] if flats.ndim == 2 else rows
            means.append(rows.mean(axis=0, dtype=np.float64).astype(np.float32))
    return data, *means


def read_dxchange_counts(path: str | os.PathLike) -> tuple[np.ndarray, ...]:
    """A Data Exchange HDF5 scan as the detector gave it: ``/exchange/data`` (projections of
    counts), the mean white (flat) and dark images, the angles (degrees, float64); checked as
    :func:`read_dxchange` says."""
    layout = dxchange_layout(Path(path))
    data, white, dark = dxchange_rows(Path(path), 0, layout.shape[1])
    return data, white, dark, np.asarray(layout.angles_deg)


def line_integrals(counts: np.ndarray, white: np.ndarray, dark: np.ndarray) -> np.ndarray:
    """``-log((counts - dark) / (white - dark))`` as float32 (projections of any leading
    shape; ``white`` and ``dark`` of one projection's shape, or scalars), finite: the
    transmission is clipped to a small positive minimum first."""
    white, dark = np.float32(white), np.float32(dark)
    denominator = np.maximum(white - dark, np.float32(_MIN_TRANSMISSION))
    projections = np.array(counts, dtype=np.float32)
    projections -= dark
    projections /= denominator
    np.maximum(projections, np.float32(_MIN_TRANSMISSION), out=projections)
    np.log(projections, out=projections)
    np.negative(projections, out=projections)
    return projections
