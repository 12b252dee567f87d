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


def write_slab(staging: str | os.PathLike, first: int, slab: np.ndarray) -> tuple[int, int]:
    """Writes one rank's slices ``first`` .. ``first + len(slab) - 1`` (atomically, durably);
    returns (first, count)."""
    import h5py

    path = Path(staging) / f"slab-{first:06d}.h5"
    with atomic_output(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset(DATASET, data=np.asarray(slab, dtype=np.float32))
    return first, len(slab)


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
