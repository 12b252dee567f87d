"""``spark-mpi bench launch``: how long it takes to start an MPI job through Spark.

Three figures from one process and one SparkSession: a trivial N-rank job through
:func:`run_mpi`, the same trivial program under the MPI library's own ``mpiexec -n N``
(the baseline), and one submission to an already running :class:`MPISession`.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

from rich.progress import track

from sparkmpi.bench.report import bar_plot, print_table, write_json

TRIVIAL_PROGRAM = "from mpi4py import MPI; MPI.COMM_WORLD.Barrier()"


def trivial_job(comm, rows):
    """The benchmark's MPI program: initialise, one barrier, finish."""
    comm.Barrier()
    return [comm.rank]


def noop_submission(comm, data):
    return comm.rank


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(spark, ranks: int, repeat: int, submissions: int, gap: float = 0.5) -> dict:
    """Median seconds of each way to launch; every job is checked to have all ``ranks``.

    Each timed launch starts after ``gap`` idle seconds, as a job arriving at an idle cluster
    would (on two cores, back-to-back launches mostly measure each other's clean-up)."""
    from sparkmpi import MPISession, run_mpi
    from sparkmpi.runner.runtime import get_runtime

    mpiexec = str(get_runtime("mpich").mpiexec)

    def spark_job() -> float:
        start = time.perf_counter()
        out = run_mpi(spark, trivial_job, ranks=ranks, output=None)
        elapsed = time.perf_counter() - start  # the job has run; its results are cached
        assert sorted(out.collect()) == list(range(ranks)), "a rank is missing"
        out.unpersist()
        return elapsed

    def mpiexec_job() -> None:
        cmd = [mpiexec, "-n", str(ranks), sys.executable, "-c", TRIVIAL_PROGRAM]
        subprocess.run(cmd, check=True, timeout=120, stdin=subprocess.DEVNULL)

    spark_job(), mpiexec_job()  # warm-up: JVM classes, page cache
    spark_s, mpiexec_s = [], []
    for _ in track(range(repeat), description=f"launching {ranks}-rank jobs"):
        time.sleep(gap)
        spark_s.append(spark_job())
        time.sleep(gap)
        mpiexec_s.append(_timed(mpiexec_job))
    dispatch_s = []
    with MPISession(spark, ranks, output=None) as session:
        session.run(noop_submission)
        for _ in track(range(submissions), description="session submissions"):
            dispatch_s.append(_timed(lambda: session.run(noop_submission)))
    result = {
        "ranks": ranks,
        "repeat": repeat,
        "gap_s": gap,
        "spark_job_s": statistics.median(spark_s),
        "mpiexec_s": statistics.median(mpiexec_s),
        "session_dispatch_s": statistics.median(dispatch_s),
        "samples": {
            "spark_job_s": spark_s,
            "mpiexec_s": mpiexec_s,
            "session_dispatch_s": dispatch_s,
        },
    }
    result["spark_over_mpiexec"] = result["spark_job_s"] / result["mpiexec_s"]
    return result


def main(args: argparse.Namespace) -> int:
    from sparkmpi.runner.context import spark_session

    spark = spark_session(args.master, cores=args.ranks, app_name="spark-mpi bench launch")
    try:
        r = measure(spark, args.ranks, args.repeat, args.submissions, args.gap)
    finally:
        spark.stop()
    print_table(
        f"Launch of a trivial {r['ranks']}-rank MPI job (median of {r['repeat']})",
        ["how", "seconds", "ratio to mpiexec"],
        [
            ["mpiexec -n N (baseline)", r["mpiexec_s"], 1.0],
            ["run_mpi through Spark", r["spark_job_s"], r["spark_over_mpiexec"]],
            [
                "MPISession submission",
                r["session_dispatch_s"],
                r["session_dispatch_s"] / r["mpiexec_s"],
            ],
        ],
    )
    print(
        f"Spark job / mpiexec = {r['spark_over_mpiexec']:.2f}x; "
        f"session submission = {r['session_dispatch_s'] * 1e3:.2f} ms"
    )
    write_json(args.json, r)
    bar_plot(
        args.plot,
        f"Launching a trivial {r['ranks']}-rank MPI job",
        ["mpiexec -n N", "run_mpi (Spark)", "session submit"],
        [r["mpiexec_s"], r["spark_job_s"], r["session_dispatch_s"]],
    )
    return 0
