"""``spark-mpi bench ptycho``: the seed's SHARP case (512 frames of 128², 100 iterations).

The solver runs as 1 and 2 MPI ranks through :func:`run_mpi` (frames split over the ranks,
update sums Allreduced every iteration) and is timed inside the ranks; the baseline measured in
the same process is the FFT-only bound: the two batched FFTs of every iteration over all frames
(scipy.fft, in place, with as many worker threads as ranks, in one batch or in cache-sized
batches, whichever is faster), which any solver has to pay.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from sparkmpi.bench.report import bar_plot, print_table, write_json

FFT_ITERATIONS_TIMED = 10


def fft_bound(frames: int, n: int, iterations: int, workers: int, batch: int) -> float:
    """Seconds for ``iterations`` x (forward + inverse) complex64 FFTs of all the frames, in
    place, ``batch`` frames per call, with ``workers`` threads."""
    import scipy.fft

    timed = min(iterations, FFT_ITERATIONS_TIMED)
    stack = np.ones((min(batch, frames), n, n), dtype=np.complex64)
    scipy.fft.fft2(stack, norm="ortho", workers=workers)
    start = time.perf_counter()
    for _ in range(timed * -(-frames // len(stack))):
        stack = scipy.fft.fft2(stack, norm="ortho", overwrite_x=True, workers=workers)
        stack = scipy.fft.ifft2(stack, norm="ortho", overwrite_x=True, workers=workers)
    return (time.perf_counter() - start) / timed * iterations


def main(args: argparse.Namespace) -> int:
    from sparkmpi.apps.ptycho.pipeline import reconstruct
    from sparkmpi.apps.ptycho.simulate import simulate
    from sparkmpi.apps.ptycho.solver import SolverSettings, phase_error
    from sparkmpi.runner.context import spark_session

    if args.quick:
        args.frames, args.size, args.iterations = 64, 64, 10
    ranks = [int(r) for r in args.ranks.split(",")]
    scan = simulate(args.frames, args.size)
    # the bound for N ranks: N FFT threads, in one batch of all frames or in cache-sized
    # batches of 16 per thread as the solver does, whichever is faster
    batched = {
        str(r): fft_bound(args.frames, args.size, args.iterations, r, args.frames) for r in ranks
    }
    chunked = {str(r): fft_bound(args.frames, args.size, args.iterations, r, 16 * r) for r in ranks}
    bounds = {r: min(batched[r], chunked[r]) for r in batched}
    settings = SolverSettings(args.algorithm, args.iterations)
    spark = spark_session(args.master, cores=max(ranks), app_name="spark-mpi bench ptycho")
    solver_s, end_to_end, errors = {}, {}, {}
    quiet = lambda *_: None  # noqa: E731
    try:
        # compiles and caches the numba kernels outside the timings
        reconstruct(spark, scan, SolverSettings(args.algorithm, 1), ranks=max(ranks), output=quiet)
        for r in ranks:
            rec, record = reconstruct(spark, scan, settings, ranks=r, output=quiet)
            lit = (rec.illumination > 0.5 * rec.illumination.max()).astype(float)
            errors[str(r)] = phase_error(rec.object, scan.truth_object, lit, remove_ramp=True)
            solver_s[str(r)], end_to_end[str(r)] = record["solver_s"], record["seconds"]
    finally:
        spark.stop()
    first = str(ranks[0])
    result = {
        "frames": args.frames,
        "frame_size": args.size,
        "iterations": args.iterations,
        "algorithm": args.algorithm,
        "seconds": solver_s,
        "end_to_end_s": end_to_end,
        "fft_bound_s": min(bounds.values()),
        "fft_bound_by_workers_s": bounds,
        "fft_one_batch_s": batched,
        "fft_chunked_s": chunked,
        "ratio_to_fft_bound": {r: solver_s[r] / bounds[r] for r in solver_s},
        "speedup_over_1_rank": {r: solver_s[first] / solver_s[r] for r in solver_s},
        "phase_error_rad": errors,
    }
    print_table(
        f"{args.algorithm.upper()}: {args.frames} frames of {args.size}², {args.iterations} "
        "iterations",
        [
            "ranks",
            "solver s",
            "end to end s",
            "FFT bound s",
            "÷ FFT bound",
            "speed-up",
            "phase err",
        ],
        [
            [
                r,
                solver_s[r],
                end_to_end[r],
                bounds[r],
                solver_s[r] / bounds[r],
                solver_s[first] / solver_s[r],
                errors[r],
            ]
            for r in solver_s
        ],
    )
    write_json(args.json, result)
    bar_plot(
        args.plot,
        f"{args.algorithm.upper()}, {args.frames}x{args.size}², {args.iterations} iterations",
        [label for r in solver_s for label in (f"FFT bound, {r} thr.", f"solver, {r} rank(s)")],
        [value for r in solver_s for value in (bounds[r], solver_s[r])],
    )
    return 0
