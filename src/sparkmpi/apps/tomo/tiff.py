"""Tilt series as multi-page TIFF stacks: written with their angles, read whole or a range of
detector rows at a time, damaged files refused."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from sparkmpi.apps.tomo.io import (
    SeriesLayout,
    TiltSeries,
    TomoInputError,
    check_exists,
    series_of,
)
from sparkmpi.files import atomic_output, reason

SIDECAR_SUFFIXES = (".rawtlt", ".tlt")


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


class _Complaints(logging.Handler):
    """Keeps the messages of the warnings and errors logged to it."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(" ".join(record.getMessage().split()))


@contextmanager
def _tifffile_complaints() -> Iterator[list[str]]:
    """The warnings tifffile logs meanwhile (e.g. about a truncated file, of which it reads
    what it can), kept instead of printed: they become our one-line error."""
    complaints = _Complaints()
    logger = logging.getLogger("tifffile")
    saved = logger.level, logger.propagate
    logger.setLevel(logging.WARNING)
    logger.propagate = False
    logger.addHandler(complaints)
    try:
        yield complaints.messages
    finally:
        logger.removeHandler(complaints)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


def tiff_layout(path: Path, angles_deg) -> SeriesLayout:
    """The layout of a multi-page TIFF from its page headers alone, checked: readable, no page
    whose data lies past the end of the file (a truncated file), 2-D pages of one shape and a
    numeric sample type, one angle per page (see :func:`read_tiff_series`)."""
    import tifffile

    size = path.stat().st_size
    with _tifffile_complaints() as complaints:
        try:
            with tifffile.TiffFile(path) as tif:
                pages = list(tif.pages)  # headers only
                description = pages[0].description if pages else ""
                damaged = [i for i, page in enumerate(pages) if _data_end(page) > size]
                shapes = [(page.shape, page.dtype) for page in pages]
        except Exception as exc:
            raise TomoInputError(f"{path}: not a readable TIFF ({reason(exc)})") from None
    if complaints or damaged:
        why = complaints[0] if complaints else f"page {damaged[0]}'s data lies past the end"
        raise TomoInputError(f"{path}: damaged TIFF ({why}); {len(pages)} page headers readable")
    if not pages:
        raise TomoInputError(f"{path}: TIFF has no pages")
    for i, (shape, _) in enumerate(shapes):
        if len(shape) != 2:
            raise TomoInputError(f"{path}: page {i} has shape {shape}, not a 2-D greyscale image")
        if shape != shapes[0][0]:
            raise TomoInputError(f"{path}: page {i} has shape {shape}, page 0 {shapes[0][0]}")
    if shapes[0][1] is None or np.dtype(shapes[0][1]).kind not in "iuf":
        raise TomoInputError(f"{path}: unsupported sample type {shapes[0][1]}")
    info = _description_json(description)
    angles = _tiff_angles(path, angles_deg, info, len(pages))
    scale, offset = (float(info["scale"]), float(info["offset"])) if "scale" in info else (1, 0)
    return SeriesLayout(
        str(path),
        "tiff",
        (len(pages), *shapes[0][0]),
        tuple(float(a) for a in angles),
        str(info.get("source") or path.name),
        scale,
        offset,
    )


def _data_end(page) -> int:
    ends = zip(page.dataoffsets, page.databytecounts, strict=True)
    return max((offset + count for offset, count in ends), default=0)


def _tiff_angles(path: Path, angles_deg, info: dict, count: int) -> np.ndarray:
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
    if len(angles) != count:
        raise TomoInputError(
            f"{path}: {count} projections but {len(angles)} tilt angles (from {origin})"
        )
    return angles


def read_tiff_rows(layout: SeriesLayout, first: int, stop: int) -> np.ndarray:
    """Rows first..stop-1 of every page; uncompressed pages are read in place, others decoded
    whole a page at a time."""
    import tifffile

    n_angles, _, n_cols = layout.shape
    out = np.empty((n_angles, stop - first, n_cols), dtype=np.float32)
    with _tifffile_complaints() as complaints, tifffile.TiffFile(layout.path) as tif:
        for i, page in enumerate(tif.pages):
            if page.is_contiguous and page.is_final:
                dtype = np.dtype(page.dtype).newbyteorder(tif.byteorder)
                count = (stop - first) * n_cols
                offset = page.dataoffsets[0] + first * n_cols * dtype.itemsize
                tif.filehandle.seek(offset)
                rows = np.frombuffer(tif.filehandle.read(count * dtype.itemsize), dtype, count)
                out[i] = rows.reshape(stop - first, n_cols)
            else:
                try:
                    out[i] = page.asarray()[first:stop]
                except Exception as exc:
                    raise TomoInputError(
                        f"{layout.path}: damaged TIFF (page {i}: {reason(exc)})"
                    ) from None
    if complaints:
        raise TomoInputError(f"{layout.path}: damaged TIFF ({complaints[0]})")
    if layout.scale != 1 or layout.offset != 0:
        out *= np.float32(layout.scale)
        out += np.float32(layout.offset)
    return out


def read_tiff_series(
    path: str | os.PathLike, angles_deg: np.ndarray | list[float] | None = None
) -> TiltSeries:
    """The tilt series in a multi-page greyscale TIFF (any integer or float sample type).

    Angles come from ``angles_deg``, else a ``<stem>.rawtlt``/``<stem>.tlt`` file beside the
    TIFF, else the JSON written by :func:`write_tiff_series`. Any problem with the file or the
    angles (a truncated file included) raises :class:`TomoInputError`.
    """
    path = Path(path)
    check_exists(path)
    return series_of(tiff_layout(path, angles_deg))


def _description_json(description: str) -> dict:
    try:
        info = json.loads(description)
    except (TypeError, ValueError):
        return {}
    return info if isinstance(info, dict) and info.get("sparkmpi_tilt_series") else {}
