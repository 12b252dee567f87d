"""What the viewer shows: a volume or a complex image loaded from an app's output file."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sparkmpi.files import InputFileError, reason

VOLUME_SUFFIXES = (".h5", ".hdf5", ".npy", ".tif", ".tiff", ".vti")


class ViewerInputError(InputFileError):
    """A file the viewer cannot show; one line naming the file."""


@dataclass
class Dataset:
    """A 3-D ``volume`` (nz, ny, nx) float32, or 2-D ``images`` by name (e.g. amplitude and
    phase of a ptychographic object), with metadata and, for streamed results, the error
    curve."""

    source: str
    volume: np.ndarray | None = None
    images: dict[str, np.ndarray] = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)
    errors: list[float] = field(default_factory=list)


def _ptycho(path: Path, f) -> Dataset:
    from sparkmpi.apps.ptycho.figures import illuminated_object

    obj = f["object"][()]
    lit = f["illumination"][()] if "illumination" in f else np.ones(obj.shape)
    shown, _ = illuminated_object(obj, lit)
    meta = {}
    for key in ("summary", "record"):
        if key in f.attrs:
            meta.update(json.loads(f.attrs[key]))
    if "frames" in f:
        meta["frames used"] = len(f["frames"][()])
    return Dataset(
        str(path),
        images={
            "phase": np.angle(shown).astype(np.float32),
            "amplitude": np.abs(shown).astype(np.float32),
            "probe amplitude": np.abs(f["probe"][()]).astype(np.float32),
        },
        metadata=meta,
        errors=[float(e) for e in f["errors"][()]] if "errors" in f else [],
    )


def load(path: str | os.PathLike) -> Dataset:
    """The dataset in ``path``; :class:`ViewerInputError` if it is missing or not one."""
    from sparkmpi.apps.tomo.volume import read_volume

    path = Path(path)
    if not path.is_file():
        raise ViewerInputError(f"{path}: no such file")
    if path.suffix.lower() not in VOLUME_SUFFIXES:
        raise ViewerInputError(
            f"{path}: not a volume or result file ({', '.join(VOLUME_SUFFIXES)})"
        )
    streamed: dict = {}
    errors: list[float] = []
    try:
        if path.suffix.lower() in (".h5", ".hdf5"):
            import h5py

            with h5py.File(path, "r") as f:
                if "object" in f and "probe" in f:
                    return _ptycho(path, f)
                if "summary" in f.attrs:  # a streamed volume (streaming tomography)
                    streamed = json.loads(f.attrs["summary"])
                    errors = [float(e) for e in f["errors"][()]] if "errors" in f else []
        volume = np.asarray(read_volume(path), dtype=np.float32)
    except ViewerInputError:
        raise
    except Exception as exc:
        raise ViewerInputError(f"{path}: cannot be read ({reason(exc)})") from None
    if volume.ndim == 2:
        return Dataset(str(path), images={"image": volume}, metadata={"shape": list(volume.shape)})
    if volume.ndim != 3 or min(volume.shape) < 1 or not np.isfinite(volume).all():
        raise ViewerInputError(f"{path}: expected a finite 3-D volume, got shape {volume.shape}")
    stats = {
        "shape (z, y, x)": list(volume.shape),
        "min": float(volume.min()),
        "max": float(volume.max()),
        "mean": float(volume.mean()),
        **streamed,
    }
    return Dataset(str(path), volume=volume, metadata=stats, errors=errors)
