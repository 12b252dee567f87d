"""The Parquet stage: one row per detector row (slice), holding that slice's sinogram; a file
or a directory of part files, converted from TIFF/HDF5 by Spark tasks.

Columns: ``slice`` (int32) and ``sinogram`` (binary, the little-endian float32 bytes of an
(n_angles, n_cols) array). The schema metadata key ``sparkmpi.tomo`` holds JSON with
``angles_deg``, ``n_angles``, ``n_rows``, ``n_cols`` and ``source``.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import uuid
from functools import partial
from pathlib import Path

import numpy as np

from sparkmpi.apps.tomo.io import (
    SeriesLayout,
    TiltSeries,
    TomoInputError,
    inspect_series,
    read_rows,
)
from sparkmpi.files import atomic_output, fsync_path, reason

METADATA_KEY = b"sparkmpi.tomo"
MAX_ROWS_PER_GROUP = 16
MAX_GROUP_BYTES = 64 << 20
_FLOAT32_LE = np.dtype("<f4")


def _schema(meta: dict):
    import pyarrow as pa

    return pa.schema(
        [("slice", pa.int32()), ("sinogram", pa.binary())],
        metadata={METADATA_KEY: json.dumps(meta).encode()},
    )


def tilt_metadata(shape: tuple[int, int, int], angles_deg, source: str) -> dict:
    n_angles, n_rows, n_cols = shape
    return {
        "angles_deg": [float(a) for a in angles_deg],
        "n_angles": int(n_angles),
        "n_rows": int(n_rows),
        "n_cols": int(n_cols),
        "source": str(source),
    }


def write_part(path: str | os.PathLike, meta: dict, first: int, projections: np.ndarray) -> int:
    """Writes the slices ``first`` .. of ``projections`` (n_angles, rows, n_cols) atomically as
    one Parquet file, in row groups of at most 16 slices (fewer when that would exceed ~64 MB)
    so that Spark can split it across tasks; returns the number of slices."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n_angles, n_rows, n_cols = projections.shape
    schema = _schema(meta)
    row_bytes = n_angles * n_cols * _FLOAT32_LE.itemsize
    per_group = max(1, min(MAX_ROWS_PER_GROUP, MAX_GROUP_BYTES // max(row_bytes, 1)))
    with atomic_output(path) as tmp, pq.ParquetWriter(tmp, schema) as writer:
        for start in range(0, n_rows, per_group):
            rows = range(start, min(start + per_group, n_rows))
            sinograms = [projections[:, r, :].astype(_FLOAT32_LE).tobytes() for r in rows]
            table = pa.Table.from_arrays(
                [pa.array([first + r for r in rows], pa.int32()), pa.array(sinograms, pa.binary())],
                schema=schema,
            )
            writer.write_table(table, row_group_size=per_group)
    return n_rows


def write_parquet(series: TiltSeries, path: str | os.PathLike) -> None:
    """Writes ``series`` atomically as one Parquet file with one row per slice, in slice order,
    from this process (small series; :func:`convert_to_parquet` converts files on Spark)."""
    meta = tilt_metadata(series.projections.shape, series.angles_deg, series.source)
    write_part(path, meta, 0, series.projections)


def even_ranges(n: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous ranges (first, stop) of 0..n-1, as even as can be."""
    bounds = np.linspace(0, n, parts + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in itertools.pairwise(bounds)]


def _convert_range(
    layout: SeriesLayout, meta: dict, staging: str, rows: tuple[int, int]
) -> int | str:
    """On an executor: writes one part; the slices written, or why the file is unusable (a
    message, not an exception, so that the failure is one line, not Spark's task error)."""
    first, stop = rows
    try:
        projections = read_rows(layout, first, stop)
    except TomoInputError as exc:
        return str(exc)
    if not np.isfinite(projections).all():
        return (
            f"{layout.path}: projections contain NaN or infinite values (rows {first}..{stop - 1})"
        )
    return write_part(Path(staging) / f"part-{first:06d}.parquet", meta, first, projections)


def convert_to_parquet(
    spark,
    source: str | os.PathLike,
    output: str | os.PathLike,
    angles_deg=None,
    partitions: int | None = None,
) -> dict:
    """Converts a TIFF stack or Data Exchange scan into the Parquet directory ``output`` (one
    part file per range of detector rows) with Spark tasks: this process reads only the file's
    headers (:func:`~sparkmpi.apps.tomo.io.inspect_series`, which checks them) and plans the
    ranges; each task reads its rows where it runs and writes its part. Ranges are at least
    ``partitions`` (default: Spark's parallelism) and at most ~64 MB of projections each.
    All or nothing: parts go to a staging directory that replaces ``output`` at the end.
    Returns the metadata."""
    layout = inspect_series(source, angles_deg)
    meta = tilt_metadata(layout.shape, layout.angles_deg, layout.source)
    n_angles, n_rows, n_cols = layout.shape
    sc = spark.sparkContext
    row_bytes = n_angles * n_cols * _FLOAT32_LE.itemsize
    count = max(partitions or sc.defaultParallelism, -(-n_rows * row_bytes // MAX_GROUP_BYTES))
    ranges = even_ranges(n_rows, min(count, n_rows))
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = output.with_name(f".{output.name}.tmp-{uuid.uuid4().hex[:8]}")
    staging.mkdir()
    try:
        convert = partial(_convert_range, layout, meta, str(staging))
        written = sc.parallelize(ranges, len(ranges)).map(convert).collect()
        for problem in (w for w in written if isinstance(w, str)):
            raise TomoInputError(problem)
        if sum(written) != n_rows:
            raise RuntimeError(f"{source}: wrote {sum(written)} of {n_rows} slices")
        if output.is_dir():
            shutil.rmtree(output)
        elif output.exists():
            output.unlink()
        os.replace(staging, output)
        fsync_path(output.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return meta


def _files(path: Path) -> list[Path]:
    """The Parquet file ``path``, or the part files of the directory ``path`` (at least one);
    :class:`TomoInputError` otherwise."""
    if path.is_dir():
        parts = sorted(p for p in path.glob("*.parquet") if not p.name.startswith((".", "_")))
        if not parts:
            raise TomoInputError(f"{path}: directory holds no .parquet part files")
        return parts
    if not path.is_file():
        raise TomoInputError(f"{path}: no such file")
    return [path]


def read_metadata(path: str | os.PathLike) -> dict:
    """The tilt-series metadata (``angles_deg``, ``n_angles``, ``n_rows``, ``n_cols``,
    ``source``) of a Parquet file written by :func:`write_parquet`, or of a directory of part
    files; anything else raises :class:`TomoInputError`."""
    import pyarrow.parquet as pq

    path = Path(path)
    part = _files(path)[0]
    try:
        schema = pq.read_schema(part)
    except Exception as exc:
        raise TomoInputError(f"{part}: not a readable Parquet file ({reason(exc)})") from None
    raw = (schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise TomoInputError(f"{path}: not a spark-mpi tilt series (no sparkmpi.tomo metadata)")
    try:
        meta = json.loads(raw)
        for key in ("n_angles", "n_rows", "n_cols"):
            meta[key] = int(meta[key])
        meta["angles_deg"] = [float(a) for a in meta["angles_deg"]]
    except (ValueError, TypeError, KeyError) as exc:
        raise TomoInputError(f"{path}: corrupt sparkmpi.tomo metadata ({reason(exc)})") from None
    meta.setdefault("source", path.name)
    return meta


def _check_groups(size: int, groups) -> list:
    """On an executor: for each (file, row group), its slice numbers and the first slice whose
    sinogram is not ``size`` bytes (or None); or the reason a file cannot be read."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    found = []
    for file, group in groups:
        try:
            table = pq.ParquetFile(file).read_row_group(group, columns=["slice", "sinogram"])
        except Exception as exc:
            return [(file, None, f"not a readable Parquet file ({reason(exc)})")]
        numbers = table.column("slice").to_numpy(zero_copy_only=False)
        lengths = pc.fill_null(pc.binary_length(table.column("sinogram")), -1).to_numpy()
        bad = numbers[lengths != size]
        found.append((file, numbers.astype(np.int64), int(bad.min()) if len(bad) else None))
    return found


def check_slices(spark, path: str | os.PathLike, meta: dict) -> None:
    """Checks, before any reconstruction, that the Parquet tilt series at ``path`` has the
    columns ``slice`` (integer) and ``sinogram`` (binary), one row per slice 0..n_rows-1, and
    sinograms of n_angles x n_cols float32 each; :class:`TomoInputError` (one line naming the
    file) otherwise. Schemas and row groups come from the footers; the row groups are read by
    Spark tasks where they run, which send back only slice numbers and the first bad one."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path).resolve()
    groups = []
    for file in _files(path):
        try:
            footer = pq.ParquetFile(file)
        except Exception as exc:
            raise TomoInputError(f"{file}: not a readable Parquet file ({reason(exc)})") from None
        schema = footer.schema_arrow
        for name, kind, test in (
            ("slice", "integers", pa.types.is_integer),
            ("sinogram", "binary", lambda t: pa.types.is_binary(t) or pa.types.is_large_binary(t)),
        ):
            if name not in schema.names:
                raise TomoInputError(
                    f"{file}: no column {name!r} (columns: {', '.join(schema.names)})"
                )
            if not test(schema.field(name).type):
                raise TomoInputError(
                    f"{file}: column {name!r} holds {schema.field(name).type}, not {kind}"
                )
        groups += [(str(file), g) for g in range(footer.metadata.num_row_groups)]
    size = meta["n_angles"] * meta["n_cols"] * _FLOAT32_LE.itemsize
    tasks = max(1, min(len(groups), spark.sparkContext.defaultParallelism))
    found = (
        spark.sparkContext.parallelize(groups, tasks)
        .mapPartitions(lambda part: _check_groups(size, list(part)))
        .collect()
    )
    for file, _, why in found:
        if isinstance(why, str):
            raise TomoInputError(f"{file}: {why}")
    numbers = np.sort(np.concatenate([n for _, n, _ in found] or [np.zeros(0, np.int64)]))
    n_rows = meta["n_rows"]
    if not np.array_equal(numbers, np.arange(n_rows)):
        raise TomoInputError(
            f"{path}: {len(numbers)} rows do not hold each of slices 0..{n_rows - 1} once"
        )
    bad = [(first, file) for file, _, first in found if first is not None]
    if bad:
        first, file = min(bad)
        raise TomoInputError(
            f"{file}: slice {first}'s sinogram is not {meta['n_angles']} x "
            f"{meta['n_cols']} float32 ({size} bytes)"
        )


def _row_groups(path: Path, first: int, stop: int) -> list[tuple[int, int, Path, int]]:
    """(min slice, max slice, file, group) of the row groups that may hold slices
    first..stop-1, by the slice column's statistics (a group without them is kept)."""
    import pyarrow.parquet as pq

    groups = []
    for file in _files(path):
        metadata = pq.ParquetFile(file).metadata
        column = metadata.schema.names.index("slice")
        for group in range(metadata.num_row_groups):
            stats = metadata.row_group(group).column(column).statistics
            known = stats is not None and stats.has_min_max
            low, high = (stats.min, stats.max) if known else (-(2**62), 2**62)
            if low < stop and high >= first:
                groups.append((low, high, file, group))
    return sorted(groups, key=lambda g: (g[0], g[1]))


def read_slices(path: str | os.PathLike, first: int, stop: int):
    """(slice, sinogram bytes) of slices first..stop-1 of a Parquet tilt series (a file or a
    directory of parts), in slice order, read straight from the files: only the row groups
    that hold them, one group at a time when groups do not interleave (as written here),
    else all selected groups at once."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    groups = _row_groups(Path(path), first, stop)
    apart = all(a[1] < b[0] for a, b in itertools.pairwise(groups))
    batches = [[g] for g in groups] if apart else [groups] if groups else []
    for batch in batches:
        table = pa.concat_tables(
            pq.ParquetFile(file).read_row_group(group, columns=["slice", "sinogram"])
            for _, _, file, group in batch
        )
        numbers = table.column("slice").to_numpy()
        blobs = table.column("sinogram")
        for i in np.argsort(numbers, kind="stable"):
            if first <= numbers[i] < stop:
                yield int(numbers[i]), blobs[int(i)].as_buffer()


def decode_sinogram(data: bytes | bytearray | memoryview, n_angles: int, n_cols: int) -> np.ndarray:
    """The writable float32 (n_angles, n_cols) sinogram encoded in ``data``; a byte count
    that does not match the shape raises ValueError."""
    expected = n_angles * n_cols * _FLOAT32_LE.itemsize
    got = memoryview(data).nbytes
    if got != expected:
        raise ValueError(
            f"sinogram of {n_angles} x {n_cols} float32 needs {expected} bytes, got {got}"
        )
    array = np.frombuffer(data, dtype=_FLOAT32_LE).reshape(n_angles, n_cols)
    return array.astype(np.float32, copy=True)


def read_parquet(path: str | os.PathLike) -> TiltSeries:
    """The whole tilt series stored by :func:`write_parquet` (a file or directory of parts),
    slices in order; missing or duplicated slices raise :class:`TomoInputError`."""
    import pyarrow.parquet as pq

    path = Path(path)
    meta = read_metadata(path)
    try:
        table = pq.read_table(path, columns=["slice", "sinogram"])
    except Exception as exc:
        raise TomoInputError(f"{path}: not a readable Parquet file ({reason(exc)})") from None
    slices = np.asarray(table.column("slice").to_numpy(), dtype=np.int64)
    order = np.argsort(slices, kind="stable")
    if not np.array_equal(slices[order], np.arange(meta["n_rows"])):
        raise TomoInputError(
            f"{path}: {len(slices)} rows do not hold each of slices 0..{meta['n_rows'] - 1} once"
        )
    blobs = table.column("sinogram").to_pylist()
    n_angles, n_cols = meta["n_angles"], meta["n_cols"]
    projections = np.empty((n_angles, meta["n_rows"], n_cols), dtype=np.float32)
    for row, i in enumerate(order):
        projections[:, row, :] = decode_sinogram(blobs[i], n_angles, n_cols)
    return TiltSeries(projections, np.asarray(meta["angles_deg"]), meta["source"])
