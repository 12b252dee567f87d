"""Tilt series in and out: multi-page TIFF stacks and Data Exchange HDF5 (APS) scans."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sparkmpi.files import InputFileError, atomic_output, reason

TIFF_SUFFIXES = (".tif", ".tiff")
HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf")
SIDECAR_SUFFIXES = (".rawtlt", ".tlt")
_MIN_TRANSMISSION = 1e-6


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


def write_tiff_series(path: str | os.PathLike, series: TiltSeries) -> None:
    """Writes ``series`` atomically as a 16-bit multi-page TIFF, one page per angle.

    The ImageDescription holds JSON with the angles and the offset/scale that map the stored
    0..65535 values back to the projection range, so :func:`read_tiff_series` restores the data
    to within 16-bit quantisation and needs no separate angle file.
    """
    import tifffile

    data = series.projections
    lo, hi = float(data.min()), float(data.max())
    scale = (hi - lo) / 65535 if hi > lo else 1.0
    stored = np.rint((data - lo) / scale).clip(0, 65535).astype(np.uint16)
    description = json.dumps(
        {
            "sparkmpi_tilt_series": 1,
            "angles_deg": [float(a) for a in series.angles_deg],
            "offset": lo,
            "scale": scale,
            "source": series.source,
        }
    )
    with atomic_output(path) as tmp:
        tifffile.imwrite(
            tmp, stored, photometric="minisblack", description=description, metadata=None
        )


def _read_angles_file(path: Path) -> np.ndarray:
    try:
        return np.array([float(word) for word in path.read_text().split()], dtype=np.float64)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise TomoInputError(f"{path}: not a list of tilt angles ({reason(exc)})") from None


def _check_exists(path: Path) -> None:
    if not path.is_file():
        raise TomoInputError(f"{path}: no such file")


class _Complaints(logging.Handler):
    """Keeps the messages of the warnings and errors logged to it."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(" ".join(record.getMessage().split()))


def read_tiff_series(
    path: str | os.PathLike, angles_deg: np.ndarray | list[float] | None = None
) -> TiltSeries:
    """The tilt series in a multi-page greyscale TIFF (any integer or float sample type).

    Angles come from ``angles_deg``, else a ``<stem>.rawtlt``/``<stem>.tlt`` file beside the
    TIFF, else the JSON written by :func:`write_tiff_series`. Any problem with the file or the
    angles raises :class:`TomoInputError`.
    """
    import tifffile

    path = Path(path)
    _check_exists(path)
    complaints = _Complaints()
    logger = logging.getLogger("tifffile")
    saved = logger.level, logger.propagate
    logger.setLevel(logging.WARNING)
    logger.propagate = False  # its warnings become our one-line error, not extra output
    logger.addHandler(complaints)
    try:
        with tifffile.TiffFile(path) as tif:
            pages = [page.asarray() for page in tif.pages]
            description = tif.pages[0].description if len(tif.pages) else ""
    except Exception as exc:
        raise TomoInputError(f"{path}: not a readable TIFF ({reason(exc)})") from None
    finally:
        logger.removeHandler(complaints)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
    if complaints.messages:  # e.g. a truncated file: tifffile reads the pages it can
        raise TomoInputError(
            f"{path}: damaged TIFF ({complaints.messages[0]}); {len(pages)} pages readable"
        )
    if not pages:
        raise TomoInputError(f"{path}: TIFF has no pages")
    for i, page in enumerate(pages):
        if page.ndim != 2 or page.shape != pages[0].shape:
            raise TomoInputError(
                f"{path}: page {i} has shape {page.shape}; expected 2-D greyscale pages "
                f"of one size {pages[0].shape}"
            )
    if pages[0].dtype.kind not in "iuf":
        raise TomoInputError(f"{path}: unsupported sample type {pages[0].dtype}")
    info = _description_json(description)
    projections = np.stack(pages).astype(np.float32)
    if "scale" in info and "offset" in info:
        projections = projections * np.float32(info["scale"]) + np.float32(info["offset"])

    origin = "--angles"
    if angles_deg is None:
        for suffix in SIDECAR_SUFFIXES:
            sidecar = path.with_suffix(suffix)
            if sidecar.is_file():
                angles_deg, origin = _read_angles_file(sidecar), sidecar.name
                break
    if angles_deg is None and "angles_deg" in info:
        angles_deg, origin = info["angles_deg"], "the TIFF description"
    if angles_deg is None:
        raise TomoInputError(
            f"{path}: no tilt angles: pass --angles, or put a .rawtlt file beside it"
        )
    angles = np.asarray(angles_deg, dtype=np.float64).reshape(-1)
    if len(angles) != len(projections):
        raise TomoInputError(
            f"{path}: {len(projections)} projections but {len(angles)} tilt angles (from {origin})"
        )
    return TiltSeries(projections, angles, str(info.get("source") or path.name))


def _description_json(description: str) -> dict:
    try:
        info = json.loads(description)
    except (TypeError, ValueError):
        return {}
    return info if isinstance(info, dict) and info.get("sparkmpi_tilt_series") else {}


def read_dxchange(path: str | os.PathLike) -> TiltSeries:
    """The flat- and dark-corrected line integrals ``-log((data - dark) / (white - dark))`` of a
    Data Exchange HDF5 scan, with angles from ``/exchange/theta`` (degrees).

    The result is finite: transmissions are clipped to a small positive minimum first. A file
    that is not HDF5, lacks a dataset or has inconsistent shapes raises :class:`TomoInputError`.
    """
    data, white, dark, theta = read_dxchange_counts(path)
    return TiltSeries(line_integrals(data, white, dark), theta, Path(path).name)


def read_dxchange_counts(path: str | os.PathLike) -> tuple[np.ndarray, ...]:
    """A Data Exchange HDF5 scan as the detector gave it: ``/exchange/data`` (projections of
    counts), the mean white (flat) and dark images, the angles (degrees, float64); checked as
    :func:`read_dxchange` says."""
    import h5py

    path = Path(path)
    _check_exists(path)
    try:
        f = h5py.File(path, "r")
    except Exception as exc:
        raise TomoInputError(f"{path}: not a readable HDF5 file ({reason(exc)})") from None
    names = ("data", "data_white", "data_dark", "theta")
    with f:
        for name in names:
            if not isinstance(f.get(f"/exchange/{name}"), h5py.Dataset):
                raise TomoInputError(f"{path}: missing dataset /exchange/{name}")
        arrays = {}
        for name in names:
            key = f"/exchange/{name}"
            try:
                arrays[name] = f[key][...]
            except Exception as exc:
                raise TomoInputError(f"{path}: cannot read {key} ({reason(exc)})") from None
    data, white, dark, theta = (arrays[k] for k in ("data", "data_white", "data_dark", "theta"))
    if data.ndim != 3:
        raise TomoInputError(f"{path}: /exchange/data must be 3-D, got shape {data.shape}")
    for name, flat in (("data_white", white), ("data_dark", dark)):
        if flat.ndim == 2:
            flat = flat[None]
        if flat.ndim != 3 or flat.shape[1:] != data.shape[1:] or len(flat) == 0:
            raise TomoInputError(
                f"{path}: /exchange/{name} has shape {flat.shape}, "
                f"expected (k, {data.shape[1]}, {data.shape[2]})"
            )
        arrays[name] = flat
    theta = np.asarray(theta, dtype=np.float64).reshape(-1)
    if len(theta) != len(data):
        raise TomoInputError(
            f"{path}: /exchange/data has {len(data)} projections but /exchange/theta "
            f"has {len(theta)} angles"
        )
    dark_mean = arrays["data_dark"].mean(axis=0, dtype=np.float64).astype(np.float32)
    white_mean = arrays["data_white"].mean(axis=0, dtype=np.float64).astype(np.float32)
    return data, white_mean, dark_mean, theta


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


def read_series(
    path: str | os.PathLike, angles_deg: np.ndarray | list[float] | None = None
) -> TiltSeries:
    """The tilt series in a TIFF stack (``.tif``/``.tiff``) or a Data Exchange HDF5 file
    (``.h5``/``.hdf5``/``.hdf``); ``angles_deg``, when given, overrides the file's angles."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in TIFF_SUFFIXES:
        return read_tiff_series(path, angles_deg)
    if suffix in HDF5_SUFFIXES:
        series = read_dxchange(path)
        if angles_deg is not None:
            series = TiltSeries(series.projections, angles_deg, series.source)
        return series
    raise TomoInputError(
        f"{path}: unknown tilt-series format (expected .tif/.tiff or Data Exchange .h5)"
    )
