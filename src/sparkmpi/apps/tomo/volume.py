"""Reconstructed volumes (nz, ny, nx) float32: HDF5, NumPy, TIFF stack or VTK ImageData out
and back in, and a PNG of three orthogonal slices."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np

from sparkmpi.files import atomic_output

FORMATS = (".h5", ".hdf5", ".npy", ".tif", ".tiff", ".vti")
CHUNK_SLICES = 16
_VTI_START = b'<AppendedData encoding="raw">'


def _suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(f"{path}: unknown volume format (expected .h5, .npy, .tif or .vti)")
    return suffix


def _jsonable(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def write_volume(
    volume,
    path: str | os.PathLike,
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    metadata: dict | None = None,
) -> None:
    """Writes the (nz, ny, nx) ``volume`` as float32 in the format named by the suffix of
    ``path``: ``.h5``/``.hdf5``, ``.npy``, ``.tif``/``.tiff`` or ``.vti``.

    ``volume`` is an array or an h5py dataset (a volume store): every format but ``.vti``
    is written :data:`CHUNK_SLICES` slices at a time, so a dataset is never read whole.
    ``spacing`` is the voxel size along (z, y, x), the array's axis order; it and
    ``metadata`` (as JSON) are stored where the format has room for them. The write is atomic
    and creates missing parent directories; an unknown suffix raises ValueError.
    """
    path = Path(path)
    suffix = _suffix(path)
    if not hasattr(volume, "shape"):
        volume = np.asarray(volume, dtype=np.float32)
    shape = tuple(int(n) for n in volume.shape)
    if len(shape) != 3:
        raise ValueError(f"{path}: a volume must be 3-D (nz, ny, nx), got shape {shape}")
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3:
        raise ValueError(f"{path}: spacing must be three numbers (z, y, x), got {spacing}")
    text = json.dumps(metadata or {}, default=_jsonable)
    with atomic_output(path) as tmp:
        if suffix in (".h5", ".hdf5"):
            import h5py

            with h5py.File(tmp, "w") as f:
                dataset = f.create_dataset(
                    "volume", shape, "f4", chunks=(1, *shape[1:]), compression="gzip"
                )
                for first, chunk in _chunks(volume):
                    dataset[first : first + len(chunk)] = chunk
                dataset.attrs["spacing"] = np.array(spacing)
                dataset.attrs["metadata"] = text
        elif suffix == ".npy":
            with open(tmp, "wb") as f:
                header = {"descr": "<f4", "fortran_order": False, "shape": shape}
                np.lib.format.write_array_header_2_0(f, header)
                for _, chunk in _chunks(volume):
                    f.write(chunk.astype("<f4", copy=False).tobytes())
        elif suffix in (".tif", ".tiff"):
            import tifffile

            pages = (page for _, chunk in _chunks(volume) for page in chunk)
            tifffile.imwrite(
                tmp,
                pages,
                shape=shape,
                dtype="float32",
                photometric="minisblack",
                description=text,
                metadata=None,
            )
        else:
            tmp.write_bytes(_vti_bytes(np.asarray(volume[...], dtype=np.float32), spacing))


def _chunks(volume):
    """(first slice, float32 slices) of ``volume``, :data:`CHUNK_SLICES` at a time."""
    for first in range(0, volume.shape[0], CHUNK_SLICES):
        yield first, np.ascontiguousarray(volume[first : first + CHUNK_SLICES], dtype=np.float32)


def _vti_bytes(volume: np.ndarray, spacing: tuple[float, float, float]) -> bytes:
    nz, ny, nx = volume.shape
    sz, sy, sx = spacing
    extent = f"0 {nx - 1} 0 {ny - 1} 0 {nz - 1}"
    header = (
        '<?xml version="1.0"?>\n'
        '<VTKFile type="ImageData" version="1.0" byte_order="LittleEndian" '
        'header_type="UInt64">\n'
        f'  <ImageData WholeExtent="{extent}" Origin="0 0 0" Spacing="{sx!r} {sy!r} {sz!r}">\n'
        f'    <Piece Extent="{extent}">\n'
        '      <PointData Scalars="volume">\n'
        '        <DataArray type="Float32" Name="volume" format="appended" offset="0"/>\n'
        "      </PointData>\n"
        "      <CellData/>\n"
        "    </Piece>\n"
        "  </ImageData>\n"
        "  "
    ).encode()
    payload = volume.astype("<f4", copy=False).tobytes()
    size = np.array([len(payload)], dtype="<u8").tobytes()
    return header + _VTI_START + b"\n   _" + size + payload + b"\n  </AppendedData>\n</VTKFile>\n"


def _read_vti(path: Path) -> np.ndarray:
    raw = path.read_bytes()
    start = raw.find(_VTI_START)
    match = re.search(rb'WholeExtent="([^"]*)"', raw[: start if start >= 0 else 0])
    if start < 0 or match is None:
        raise ValueError(f"{path}: not a raw-appended VTK ImageData file")
    bounds = [int(v) for v in match.group(1).split()]
    nx, ny, nz = (bounds[1] - bounds[0] + 1, bounds[3] - bounds[2] + 1, bounds[5] - bounds[4] + 1)
    offset = raw.index(b"_", start + len(_VTI_START)) + 1
    (size,) = np.frombuffer(raw, dtype="<u8", count=1, offset=offset)
    if size != nx * ny * nz * 4:
        raise ValueError(f"{path}: {size} data bytes for a {nx}x{ny}x{nz} float32 volume")
    data = np.frombuffer(raw, dtype="<f4", count=nx * ny * nz, offset=offset + 8)
    return data.reshape(nz, ny, nx)


def read_volume(path: str | os.PathLike) -> np.ndarray:
    """The float32 (nz, ny, nx) volume in a file written by :func:`write_volume`."""
    path = Path(path)
    suffix = _suffix(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if suffix in (".h5", ".hdf5"):
        import h5py

        with h5py.File(path, "r") as f:
            volume = f["volume"][...]
    elif suffix == ".npy":
        volume = np.load(path)
    elif suffix in (".tif", ".tiff"):
        import tifffile

        with tifffile.TiffFile(path) as tif:
            volume = np.stack([page.asarray() for page in tif.pages])
    else:
        volume = _read_vti(path)
    if volume.ndim == 2:
        volume = volume[None]
    return np.array(volume, dtype=np.float32)


def save_orthoslices_png(volume, path: str | os.PathLike, title: str = "") -> None:
    """Writes a PNG (atomically) of the central XY, XZ and YZ slices of the (nz, ny, nx)
    ``volume`` in grey on one colour scale (1st to 99.5th percentile of those slices) with a
    colour bar. ``volume`` may be an h5py dataset: only the three slices are read."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not hasattr(volume, "shape"):
        volume = np.asarray(volume, dtype=np.float32)
    if len(volume.shape) != 3 or 0 in volume.shape:
        raise ValueError(f"{path}: expected a non-empty (nz, ny, nx) volume, got {volume.shape}")
    nz, ny, nx = volume.shape
    cuts = [np.asarray(c, dtype=np.float32) for c in (volume[nz // 2], volume[:, ny // 2, :])]
    cuts.append(np.asarray(volume[:, :, nx // 2], dtype=np.float32))  # three slices are read
    values = np.concatenate([c.ravel() for c in cuts])
    finite = values[np.isfinite(values)]
    lo, hi = np.percentile(finite, [1, 99.5]) if finite.size else (0.0, 1.0)
    if not hi > lo:
        lo, hi = float(lo) - 0.5, float(lo) + 0.5
    aspect = "auto" if nz < 8 else "equal"
    panels = (
        (cuts[0], f"XY (z = {nz // 2})", "x", "y", "upper", "equal"),
        (cuts[1], f"XZ (y = {ny // 2})", "x", "z", "lower", aspect),
        (cuts[2], f"YZ (x = {nx // 2})", "y", "z", "lower", aspect),
    )
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.8), layout="constrained")
    try:
        for ax, (image, label, xlabel, ylabel, origin, ratio) in zip(axes, panels, strict=True):
            shown = ax.imshow(
                image,
                cmap="gray",
                vmin=lo,
                vmax=hi,
                origin=origin,
                aspect=ratio,
                interpolation="nearest",
            )
            ax.set_title(label)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
        fig.colorbar(shown, ax=axes, shrink=0.8, label="value")
        fig.suptitle(title or f"volume {nz} x {ny} x {nx}", parse_math=False)  # names hold $
        with atomic_output(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
    finally:
        plt.close(fig)
