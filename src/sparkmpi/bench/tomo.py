"""``spark-mpi bench tomo``: seconds per ART iteration on the seed's 256x256x74 → 256³ case.

ART runs as 1 and 2 MPI ranks through :func:`run_mpi` (each rank a slab of slices, all slices
sharing one system matrix, vectorised across slices), timed inside the ranks; the baseline is
the textbook loop (one slice at a time, row by row, as TomViz does it) timed on a few slices in
this process and extrapolated to all of them.
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import numpy as np
from rich.progress import track

from sparkmpi.bench.report import bar_plot, print_table, write_json


def _art_in_ranks(angles: tuple, iterations: int, comm, rows):
    from mpi4py import MPI

    from sparkmpi.apps.tomo.algorithms import art
    from sparkmpi.apps.tomo.projector import system_matrix

    pairs = sorted(rows, key=lambda p: p[0])
    sinos = np.stack([s for _, s in pairs])
    n = sinos.shape[-1]
    A = system_matrix(n, angles, n)  # built once per rank, outside the timing
    art(sinos[:1], A, 1)  # compiles / loads the kernel
    stamps = []
    comm.Barrier()
    start = time.perf_counter()
    art(
        sinos, A, iterations, beta=0.5, progress=lambda i, total: stamps.append(time.perf_counter())
    )
    per_iteration = np.diff([start, *stamps])
    slowest = comm.allreduce(float(np.median(per_iteration)), op=MPI.MAX)
    if comm.rank == 0:
        yield slowest


def _sparse_row_sweep(sinogram: np.ndarray, A, norms: np.ndarray, beta: float) -> np.ndarray:
    """One ART sweep of one slice in plain Python over the CSR rows: a stronger baseline than
    TomViz's dense rows, to show what the vectorisation alone is worth."""
    b = sinogram.ravel()
    x = np.zeros(A.shape[1], dtype=np.float32)
    indptr, indices, data = A.indptr, A.indices, A.data
    for j in range(A.shape[0]):
        if norms[j] > 0:
            cols, vals = indices[indptr[j] : indptr[j + 1]], data[indptr[j] : indptr[j + 1]]
            x[cols] += vals * (beta * (b[j] - vals @ x[cols]) / norms[j])
    return np.maximum(x, 0)


def main(args: argparse.Namespace) -> int:
    if args.scale:
        from sparkmpi.bench import tomo_scale

        return tomo_scale.main(args)
    from sparkmpi import run_mpi
    from sparkmpi.apps.tomo.algorithms import art, art_textbook
    from sparkmpi.apps.tomo.phantom import blobs_phantom, tilt_angles
    from sparkmpi.apps.tomo.projector import project, row_norms_sq, system_matrix
    from sparkmpi.runner.context import spark_session

    n = args.size
    workers = [int(w) for w in args.ranks.split(",")]
    angles = tilt_angles()
    volume = blobs_phantom((n, n, n))
    A = system_matrix(n, tuple(float(a) for a in angles), n)
    sinograms = project(volume, A)

    norms = row_norms_sq(A)
    timed = sinograms[n // 2 : n // 2 + args.textbook_slices]
    start = time.perf_counter()
    slow = [
        art_textbook(sino, A, 1, beta=0.5, norms=norms)
        for sino in track(timed, description="textbook loop")
    ]
    textbook = (time.perf_counter() - start) / len(timed) * n
    start = time.perf_counter()
    for sino in track(timed, description="sparse-row loop"):
        _sparse_row_sweep(sino, A, norms, 0.5)
    sparse_rows = (time.perf_counter() - start) / len(timed) * n
    if not np.allclose(art(timed, A, 1, beta=0.5), slow, rtol=1e-3, atol=1e-4):
        raise RuntimeError("vectorised ART differs from the textbook loop")

    spark = spark_session(args.master, cores=max(workers), app_name="spark-mpi bench tomo")
    art_s: dict[str, float] = {}
    try:
        rows = list(enumerate(sinograms))
        for w in workers:
            rdd = spark.sparkContext.parallelize(rows, w)
            fn = partial(_art_in_ranks, tuple(float(a) for a in angles), args.iterations)
            art_s[str(w)] = statistics.median(run_mpi(rdd, fn, output=None).collect())
    finally:
        spark.stop()
    result = {
        "shape": [n, n, n],
        "angles": len(angles),
        "art_iteration_s": art_s,
        "textbook_iteration_s": textbook,
        "textbook_slices_timed": len(timed),
        "sparse_row_loop_iteration_s": sparse_rows,
        "speedup_over_textbook": {w: textbook / s for w, s in art_s.items()},
    }
    print_table(
        f"One ART iteration, {n}x{n}x{len(angles)} → {n}³",
        ["how", "seconds", "times faster than textbook"],
        [
            [f"textbook loop, TomViz-style (from {len(timed)} slices)", textbook, 1.0],
            [
                f"Python loop over sparse rows (from {len(timed)} slices)",
                sparse_rows,
                textbook / sparse_rows,
            ],
        ]
        + [[f"vectorised ART, {w} MPI rank(s)", s, textbook / s] for w, s in art_s.items()],
    )
    write_json(args.json, result)
    bar_plot(
        args.plot,
        f"One ART iteration, {n}³ from {len(angles)} angles",
        ["textbook", "sparse rows", *[f"{w} rank(s)" for w in art_s]],
        [textbook, sparse_rows, *art_s.values()],
    )
    return 0
