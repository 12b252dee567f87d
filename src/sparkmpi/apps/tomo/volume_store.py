"""A volume written by the ranks, each its own slab: one HDF5 file per slab and one HDF5 file
whose ``volume`` is a virtual dataset joining them, read by ``h5py`` (and ``spark-mpi view``)
as one (nz, ny, nx) float32 array.

Why per-slab HDF5 files and a virtual dataset rather than Zarr: every reader the project
already has (``h5py``, ``read_volume``, the viewer, HDF5 tools at beamlines) opens it
unchanged; each rank writes a plain file of its own with no coordination and no parallel-HDF5
build; and the driver writes only the small virtual dataset, never the data.

Layout, for ``vol.h5``: ``vol.slabs/slab-<first slice>.h5`` (dataset ``volume``, the slab's
slices) and ``vol.h5`` (``volume``: the virtual dataset, its ``metadata`` and ``spacing``
attributes as :func:`~sparkmpi.apps.tomo.volume.write_volume` writes them). Slab paths are
relative, so the two can be moved together. All or nothing: ranks write into a temporary slab
directory, which replaces ``vol.slabs`` only when every rank has written, just before the
virtual file; a failure removes it.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np

from sparkmpi.files import atomic_output, fsync_path

DATASET = "volume"


def slab_dir(path: str | os.PathLike) -> Path:
    """Where the slabs of the volume file ``path`` live."""
    return Path(path).with_suffix(".slabs")


def staging_dir(path: str | os.PathLike) -> Path:
    """A fresh temporary directory beside ``path`` for the ranks to write their slabs into."""
    target = slab_dir(path)
    staging = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    staging.mkdir(parents=True)
    return staging


class SlabWriter:
    """One rank's slab, written chunk by chunk so the rank never holds more than a chunk:
    ``append`` adds the next slices (``first``, ``first + 1``, ... in order) and ``close``
    makes the slab file appear whole (atomically, durably) and returns (first, count). Leaving
    a ``with`` block on an exception leaves no file."""

    def __init__(self, staging: str | os.PathLike, first: int, shape: tuple[int, int]) -> None:
        import h5py

        self.first, self.count = first, 0
        self._output = atomic_output(Path(staging) / f"slab-{first:06d}.h5")
        tmp = self._output.__enter__()
        self._file = h5py.File(tmp, "w")
        self._dataset = self._file.create_dataset(
            DATASET, shape=(0, *shape), maxshape=(None, *shape), chunks=(1, *shape), dtype="f4"
        )

    def append(self, slices: np.ndarray) -> None:
        slices = np.asarray(slices, dtype=np.float32)
        start = self.count
        self.count += len(slices)
        self._dataset.resize(self.count, axis=0)
        self._dataset[start:] = slices

    def close(self) -> tuple[int, int]:
        self._file.close()
        self._output.__exit__(None, None, None)
        return self.first, self.count

    def __enter__(self) -> SlabWriter:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is not None:
            self._file.close()
            self._output.__exit__(kind, value, traceback)


def publish(
    path: str | os.PathLike,
    staging: str | os.PathLike,
    slabs: list[tuple[int, int]],
    shape: tuple[int, int],
    metadata: dict | None = None,
) -> None:
    """Makes the slabs in ``staging`` the volume ``path``: checks they tile 0..nz-1, moves
    them to :func:`slab_dir` and writes the virtual dataset (the last step)."""
    import h5py

    slabs = sorted(slabs)
    nz = sum(count for _, count in slabs)
    if [first for first, _ in slabs] != list(np.cumsum([0] + [c for _, c in slabs])[:-1]):
        raise ValueError(f"{path}: slabs {slabs} do not tile slices 0..{nz - 1}")
    target = slab_dir(path)
    layout = h5py.VirtualLayout(shape=(nz, *shape), dtype="f4")
    for first, count in slabs:
        source = f"{target.name}/slab-{first:06d}.h5"  # relative to the virtual file
        layout[first : first + count] = h5py.VirtualSource(source, DATASET, (count, *shape))
    if target.exists():
        shutil.rmtree(target)
    os.replace(staging, target)
    fsync_path(target.parent)
    with atomic_output(path) as tmp, h5py.File(tmp, "w") as f:
        dataset = f.create_virtual_dataset(DATASET, layout, fillvalue=np.nan)
        dataset.attrs["spacing"] = np.ones(3)
        dataset.attrs["metadata"] = json.dumps(metadata or {}, default=str)


def discard(staging: str | os.PathLike) -> None:
    """Removes a staging directory (after a failure)."""
    shutil.rmtree(staging, ignore_errors=True)


def remove(path: str | os.PathLike) -> None:
    """Removes the volume ``path`` and its slabs."""
    Path(path).unlink(missing_ok=True)
    shutil.rmtree(slab_dir(path), ignore_errors=True)
