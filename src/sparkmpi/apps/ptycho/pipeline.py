"""Ptychography on Spark: the frames become an RDD, its partitions become MPI ranks.

Each rank gets its frames (index, intensities, window corner) from its partition, never from
a shared file, runs the solver on them with the other ranks (``MPI_Allreduce`` of the update
sums every iteration), and rank 0 returns object, probe and the error per iteration.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from functools import partial

import numpy as np

from sparkmpi.apps.ptycho.backends import warm_up
from sparkmpi.apps.ptycho.scan import Scan, amplitudes
from sparkmpi.apps.ptycho.solver import Reconstruction, SolverSettings, solve


def frame_rdd(spark, scan: Scan, partitions: int):
    """(index, intensities, (y, x)) rows of the scan in ``partitions`` contiguous blocks."""
    corners = scan.pixel_positions()
    rows = [(j, scan.intensities[j], tuple(corners[j])) for j in range(len(scan.intensities))]
    return spark.sparkContext.parallelize(rows, partitions)


def _rank(shape: tuple[int, int], probe: np.ndarray, settings: SolverSettings, comm, rows):
    from mpi4py import MPI

    rows = sorted(rows, key=lambda r: r[0])
    n = probe.shape[0]
    frames = np.stack([r[1] for r in rows]) if rows else np.zeros((0, n, n), np.float32)
    corners = np.array([r[2] for r in rows], dtype=np.int64).reshape(-1, 2)

    def progress(i: int, error: float) -> None:
        if comm.rank == 0:
            print(f"iteration {i + 1}/{settings.iterations} error {error:.3e}", flush=True)

    warm_up(settings.backend, settings.algorithm)
    comm.Barrier()
    start = time.perf_counter()
    rec = solve(amplitudes(frames), corners, shape, probe, settings, comm, progress)
    seconds = comm.allreduce(time.perf_counter() - start, op=MPI.MAX)
    if comm.rank == 0:
        yield rec, seconds


def reconstruct(
    spark,
    scan: Scan,
    settings: SolverSettings | None = None,
    *,
    ranks: int = 2,
    output=None,
) -> tuple[Reconstruction, dict]:
    """Object and probe reconstructed by ``ranks`` MPI ranks inside Spark tasks, and a record
    of the run (settings, seconds end to end and inside the solver). ``output`` receives the
    ranks' output lines (default: printed with a ``[rank N]`` prefix)."""
    from sparkmpi import run_mpi
    from sparkmpi.runner.hub import print_prefixed

    settings = settings or SolverSettings()
    start = time.perf_counter()
    fn = partial(_rank, scan.object_shape(), scan.probe, settings)
    rdd = run_mpi(frame_rdd(spark, scan, ranks), fn, output=output or print_prefixed)
    ((rec, solver_s),) = rdd.collect()
    rdd.unpersist()
    record = {
        "ranks": ranks,
        "frames": len(scan.intensities),
        "frame_size": scan.frame_size,
        "settings": asdict(settings),
        "seconds": time.perf_counter() - start,
        "solver_s": solver_s,
        "final_error": rec.errors[-1],
        "source": scan.source,
    }
    return rec, record
