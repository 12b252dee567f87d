"""Tilt series → Parquet → Spark → per-slice reconstruction → volume.

The driver plans: it checks the Parquet tilt series (one row per slice, holding that slice's
whole sinogram), estimates the rotation centre from one slice, and divides the slices into
contiguous slab ranges, one per partition. Each partition reads its own slices from the files
and reconstructs them, either as a plain Spark task (``engine="spark"``) or as a rank of one MPI
job (``engine="mpi"``, the ranks agreeing on the reconstruction time with ``MPI_Allreduce``;
rank 0 logs every iteration). :func:`reconstruct_to_store` has each write its slab into a
volume store (FBP a chunk at a time), so nothing passes through the driver;
:func:`reconstruct` gathers the volume into the driver (``MPI_Gather`` on rank 0), for small
volumes. With ``backend="cupy"`` each rank reconstructs on its GPU
(:func:`sparkmpi.apps.cuda.use_rank_device`).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np

from sparkmpi.apps.cuda import use_rank_device
from sparkmpi.apps.tomo import volume_store
from sparkmpi.apps.tomo.algorithms import BACKENDS, FILTERS, art, estimate_center, fbp, sirt
from sparkmpi.apps.tomo.parquet import (
    check_slices,
    decode_sinogram,
    even_ranges,
    read_metadata,
    read_slices,
)
from sparkmpi.apps.tomo.projector import system_matrix
from sparkmpi.apps.tomo.volume_store import SlabWriter
from sparkmpi.memory import peak_rss_mib, reset_peak_rss, spark_jvm_peak_rss_mib

log = logging.getLogger(__name__)
ALGORITHMS = ("art", "sirt", "fbp")
ENGINES = ("mpi", "spark")
CHUNK_BYTES = 64 << 20  # FBP's working set per chunk of slices


@dataclass(frozen=True)
class ReconSettings:
    """How to reconstruct: algorithm, its iterations and relaxation, geometry, and where
    (``backend``: ``cpu`` or ``cupy``, the GPU)."""

    algorithm: str = "art"
    iterations: int = 10
    beta: float = 0.5
    positivity: bool = True
    center: float | None = None  # rotation axis in detector bins (after binning); None: estimate
    binning: int = 1  # average this many detector bins into one
    backend: str = "cpu"
    filter: str = "ramlak"  # FBP's: ramlak, shepp-logan or hann

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ValueError(
                f"algorithm must be one of {', '.join(ALGORITHMS)}, not {self.algorithm!r}"
            )
        if self.iterations < 1 or self.binning < 1 or not 0 < self.beta <= 2:
            raise ValueError("iterations and binning must be >= 1 and beta in (0, 2]")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, not {self.backend!r}")
        if self.filter not in FILTERS:
            raise ValueError(f"filter must be one of {', '.join(FILTERS)}, not {self.filter!r}")


def bin_detector(sinograms: np.ndarray, binning: int) -> np.ndarray:
    """Averages groups of ``binning`` detector bins (the last axis); drops the remainder."""
    if binning == 1:
        return sinograms
    n = sinograms.shape[-1] // binning * binning
    shape = (*sinograms.shape[:-1], n // binning, binning)
    return sinograms[..., :n].reshape(shape).mean(axis=-1, dtype=np.float32)


def reconstruct_slab(
    sinograms: np.ndarray, angles_deg: np.ndarray, settings: ReconSettings, progress=None
) -> np.ndarray:
    """Slices (nz, n, n) from their sinograms (nz, n_angles, n_det), all with one geometry, on
    ``settings.backend`` (host float32 arrays either way)."""
    sinograms = bin_detector(np.asarray(sinograms, dtype=np.float32), settings.binning)
    n_det = sinograms.shape[-1]
    center = settings.center if settings.center is not None else (n_det - 1) / 2
    if settings.algorithm == "fbp":
        return fbp(
            sinograms, angles_deg, n_det, center, filter=settings.filter, backend=settings.backend
        )
    A = system_matrix(n_det, tuple(float(a) for a in angles_deg), n_det, center)
    if settings.algorithm == "sirt":
        return sirt(
            sinograms,
            A,
            settings.iterations,
            positivity=settings.positivity,
            backend=settings.backend,
        )
    return art(
        sinograms,
        A,
        settings.iterations,
        beta=settings.beta,
        positivity=settings.positivity,
        progress=progress,
        backend=settings.backend,
    )


def choose_center(sinogram: np.ndarray, angles_deg: np.ndarray, binning: int) -> float | None:
    """The rotation centre estimated from one sinogram when the scan spans ~180°, else None."""
    span = float(np.max(angles_deg) - np.min(angles_deg))
    if span < 175:
        return None
    return estimate_center(bin_detector(sinogram[None], binning)[0], angles_deg)


def _slab(meta: dict, rows) -> tuple[np.ndarray, np.ndarray]:
    """(slice numbers, sinograms) of a partition's contiguous ``rows``, all at once."""
    for first, sinograms in _runs(meta, rows, None):
        return np.arange(first, first + len(sinograms)), sinograms
    return np.zeros(0, np.int64), np.zeros((0, meta["n_angles"], meta["n_cols"]), np.float32)


def chunk_slices(meta: dict, settings: ReconSettings) -> int | None:
    """How many slices FBP reconstructs at a time (their sinograms and slices within
    :data:`CHUNK_BYTES`); None for ART and SIRT, which reconstruct a whole slab at once."""
    if settings.algorithm != "fbp":
        return None
    n = meta["n_cols"] // settings.binning
    per_slice = 4 * (meta["n_angles"] * meta["n_cols"] + 2 * n * n)  # sinogram, slice, kernel's
    return max(1, CHUNK_BYTES // per_slice)


def _runs(meta: dict, rows, limit: int | None):
    """(first slice, sinograms) of ``limit`` consecutive slices at a time, from ``rows``
    sorted by slice; a gap raises RuntimeError (a partition holds one contiguous slab)."""

    def decoded(blobs: list) -> np.ndarray:
        return np.stack([decode_sinogram(b, meta["n_angles"], meta["n_cols"]) for b in blobs])

    first, blobs = 0, []
    for number, blob in rows:
        if blobs and int(number) != first + len(blobs):
            raise RuntimeError(f"slice {number} follows slice {first + len(blobs) - 1}")
        if not blobs:
            first = int(number)
        blobs.append(blob)
        if len(blobs) == limit:
            yield first, decoded(blobs)
            blobs = []
    if blobs:
        yield first, decoded(blobs)


def reconstruct_partition(
    meta: dict, settings: ReconSettings, staging: str, rows, progress=None
) -> tuple[int, int] | None:
    """Reconstructs one partition's contiguous slices (``rows`` sorted by slice) into its slab
    file in ``staging``, a chunk at a time for FBP; (first, count) of the slab, or None when the
    partition is empty. Memory: one chunk for FBP, the slab for ART and SIRT."""
    angles = np.asarray(meta["angles_deg"])
    with contextlib.ExitStack() as stack:
        writer = None
        for first, sinograms in _runs(meta, rows, chunk_slices(meta, settings)):
            slices = reconstruct_slab(sinograms, angles, settings, progress)
            if writer is None:
                writer = stack.enter_context(SlabWriter(staging, first, slices.shape[1:]))
            writer.append(slices)
            del sinograms, slices
        return writer.close() if writer is not None else None


def _spark_partition(meta: dict, settings: ReconSettings, parquet: str, ranges):
    index, sinos = _slab(meta, _rows(parquet, ranges))
    if len(index):
        volume = reconstruct_slab(sinos, np.asarray(meta["angles_deg"]), settings)
        yield from zip(index.tolist(), volume, strict=True)


def _spark_partition_to_store(meta, settings: ReconSettings, parquet: str, staging: str, ranges):
    reset_peak_rss()
    written = reconstruct_partition(meta, settings, staging, _rows(parquet, ranges))
    yield written, peak_rss_mib()


def _iteration_printer(comm, start: float):
    def progress(iteration: int, iterations: int) -> None:
        if comm.rank == 0:
            elapsed = time.perf_counter() - start
            print(f"iteration {iteration + 1}/{iterations} ({elapsed:.2f} s)", flush=True)

    return progress


def _mpi_rank(meta: dict, settings: ReconSettings, parquet: str, comm, ranges):
    """One rank: reconstruct its slab, log the global residual, gather the volume on rank 0."""
    if settings.backend == "cupy":
        use_rank_device(comm)
    index, sinos = _slab(meta, _rows(parquet, ranges))
    angles = np.asarray(meta["angles_deg"])
    start = time.perf_counter()
    volume = reconstruct_slab(sinos, angles, settings, _iteration_printer(comm, start))
    seconds = comm.allreduce(time.perf_counter() - start, op=_mpi_max())
    slabs = comm.gather((index, volume), root=0)
    if comm.rank == 0:
        index = np.concatenate([i for i, _ in slabs])
        volume = np.concatenate([v for _, v in slabs if len(v)])
        print(
            f"{settings.algorithm}: {len(index)} slices on {comm.size} ranks in {seconds:.2f} s",
            flush=True,
        )
        yield index[np.argsort(index)], volume[np.argsort(index)], seconds


def _mpi_max():
    from mpi4py import MPI

    return MPI.MAX


def _rows(parquet: str, partition) -> Iterator:
    """The (slice, sinogram bytes) rows of a partition's slab ranges, read where it runs."""
    for first, stop in partition:
        yield from read_slices(parquet, first, stop)


def _plan(spark, parquet, settings: ReconSettings, ranks: int):
    """The driver's part: metadata, checks, the rotation centre (from one slice), and an RDD
    of ``ranks`` partitions, each one slab's range of slices. Each task reads its slices from
    the Parquet files itself; no projection data passes through here (but that one slice) or
    through Spark's JVMs."""
    meta = read_metadata(parquet)
    check_slices(spark, parquet, meta)  # one line naming the file, before any rank starts
    angles = np.asarray(meta["angles_deg"])
    parquet = str(Path(parquet).resolve())  # the tasks' working directory may differ
    if settings.center is None:
        middle = meta["n_rows"] // 2
        for _, blob in read_slices(parquet, middle, middle + 1):
            sino = decode_sinogram(blob, meta["n_angles"], meta["n_cols"])
            center = choose_center(sino, angles, settings.binning)
            if center is not None:
                settings = ReconSettings(**{**asdict(settings), "center": center})
    ranges = even_ranges(meta["n_rows"], ranks)
    return meta, settings, parquet, spark.sparkContext.parallelize(ranges, ranks)


def _record(meta, parquet, settings, engine, ranks, shape, start, compute_s) -> dict:
    return {
        "engine": engine,
        "ranks": ranks,
        "settings": asdict(settings),
        "shape": list(shape),
        "seconds": time.perf_counter() - start,
        "reconstruction_s": compute_s,
        "source": meta.get("source", str(parquet)),
    }


def reconstruct(
    spark,
    parquet: str | Path,
    settings: ReconSettings = ReconSettings(),
    *,
    ranks: int = 2,
    engine: str = "mpi",
    output=None,
) -> tuple[np.ndarray, dict]:
    """The volume (nz, n, n) reconstructed from a Parquet tilt series, and a record of the run.

    ``ranks`` partitions of contiguous slices are reconstructed in parallel, as MPI ranks
    (``engine="mpi"``) or as plain Spark tasks (``engine="spark"``). ``output`` receives the
    ranks' output lines (default: printed with a ``[rank N]`` prefix). The volume is gathered
    in this process: :func:`reconstruct_to_store` keeps it out.
    """
    from sparkmpi import run_mpi
    from sparkmpi.runner.hub import print_prefixed

    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, not {engine!r}")
    meta, settings, path, rdd = _plan(spark, parquet, settings, ranks)
    start = time.perf_counter()
    if engine == "spark":
        pairs = rdd.mapPartitions(partial(_spark_partition, meta, settings, path)).collect()
        pairs.sort(key=lambda p: p[0])
        volume = np.stack([image for _, image in pairs])
        compute_s = None
    else:
        fn = partial(_mpi_rank, meta, settings, path)
        ((_, volume, compute_s),) = run_mpi(rdd, fn, output=output or print_prefixed).collect()
    record = _record(meta, parquet, settings, engine, ranks, volume.shape, start, compute_s)
    return volume.astype(np.float32, copy=False), record


def _mpi_rank_to_store(meta, settings: ReconSettings, parquet: str, staging: str, comm, ranges):
    """One rank: reconstruct its slab into ``staging``; rank 0 yields the slabs written
    (first slice, count), the slowest rank's seconds and the largest rank peak RSS."""
    reset_peak_rss()
    if settings.backend == "cupy":
        use_rank_device(comm)
    start = time.perf_counter()
    progress = _iteration_printer(comm, start)
    written = reconstruct_partition(meta, settings, staging, _rows(parquet, ranges), progress)
    seconds = comm.allreduce(time.perf_counter() - start, op=_mpi_max())
    peak = comm.allreduce(peak_rss_mib(), op=_mpi_max())
    slabs = comm.gather(written, root=0)
    if comm.rank == 0:
        print(f"{settings.algorithm}: slabs written on {comm.size} ranks in {seconds:.2f} s")
        yield [s for s in slabs if s is not None], seconds, peak


def reconstruct_to_store(
    spark,
    parquet: str | Path,
    path: str | Path,
    settings: ReconSettings = ReconSettings(),
    *,
    ranks: int = 2,
    engine: str = "mpi",
    output=None,
) -> dict:
    """Reconstructs a Parquet tilt series into the volume store ``path``
    (:mod:`.volume_store`: an HDF5 virtual dataset over per-slab files). Each of ``ranks``
    partitions (MPI ranks, or plain Spark tasks with ``engine="spark"``) reads its contiguous
    slices where it runs and writes its slab, FBP a chunk at a time, so neither the tilt series
    nor the volume passes through this process. Returns the record of the run (also stored
    with the volume), with this process's and the largest rank's peak RSS; on failure nothing
    is left."""
    from sparkmpi import run_mpi
    from sparkmpi.runner.hub import print_prefixed

    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, not {engine!r}")
    meta, settings, source, rdd = _plan(spark, parquet, settings, ranks)
    staging = volume_store.staging_dir(path)
    start = time.perf_counter()
    try:
        if engine == "spark":
            done = rdd.mapPartitions(
                partial(_spark_partition_to_store, meta, settings, source, str(staging))
            ).collect()
            slabs = [s for s, _ in done if s is not None]
            compute_s, rank_peak = None, max(peak for _, peak in done)
        else:
            fn = partial(_mpi_rank_to_store, meta, settings, source, str(staging))
            ((slabs, compute_s, rank_peak),) = run_mpi(
                rdd, fn, output=output or print_prefixed
            ).collect()
        n = meta["n_cols"] // settings.binning
        nz = sum(count for _, count in slabs)
        record = _record(meta, parquet, settings, engine, ranks, (nz, n, n), start, compute_s)
        record["rank_peak_rss_mib"] = rank_peak
        record["driver_peak_rss_mib"] = peak_rss_mib()
        record["jvm_peak_rss_mib"] = spark_jvm_peak_rss_mib(spark)
        volume_store.publish(path, staging, slabs, (n, n), metadata=record)
    except BaseException:
        volume_store.discard(staging)
        raise
    return record
