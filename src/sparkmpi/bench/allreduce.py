"""``spark-mpi bench allreduce``: the seed paper's Table I, Spark driver-worker vs Spark-MPI.

For each rank count N, on one SparkSession and the same N cached float32 arrays (one per
partition), the sum of the arrays is computed four ways: collected to the driver and summed
there, Spark's ``treeReduce``, ``MPI_Allreduce`` inside ranks started by :func:`run_mpi`, and
the same MPI program under the MPI library's own ``mpiexec -n N`` (the limit).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial

import numpy as np
from rich.progress import Progress

from sparkmpi.bench.allreduce_kernel import checksum, expected_sum, make_array, timed_allreduce
from sparkmpi.bench.report import print_table, write_json

RTOL = 1e-5
SETTLE_S = 1.5
ROUNDS = 3
KERNEL = "sparkmpi.bench.allreduce_kernel"
"""Idle time before each MPI measurement: lets the previous step's processes (pre-started rank
interpreters loading their libraries) finish, so two cores measure the collective, not them."""
PAPER_TABLE_I = {  # seconds on 2 / 4 / 8 / 10 nodes, 2,000,000 float32 per worker
    "collect_s": {2: 0.20, 4: 0.37, 8: 0.95, 10: 1.12},
    "mpi_allreduce_s": {2: 0.0036, 4: 0.0049, 8: 0.0060, 10: 0.0097},
}
APPROACHES = [
    ("collect_s", "Spark driver-worker (collect + sum)"),
    ("tree_reduce_s", "Spark treeReduce"),
    ("mpi_allreduce_s", "Spark-MPI Allreduce (collective)"),
    ("mpi_end_to_end_s", "Spark-MPI run_mpi call (end to end)"),
    ("mpiexec_allreduce_s", "mpiexec Allreduce (the limit)"),
]


class WrongSum(AssertionError):
    """An approach computed a different sum than the arrays have."""


def _check(name: str, value: float, expected: float) -> None:
    if not np.isclose(value, expected, rtol=RTOL):
        raise WrongSum(f"{name}: checksum {value!r} differs from the expected {expected!r}")


def _median_time(fn, repeat: int):
    fn()  # warm-up
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def _allreduce_in_ranks(repeat: int, comm, rows):
    from mpi4py import MPI

    (local,) = list(rows)
    seconds, total = timed_allreduce(comm, local, repeat)
    exact = bool(np.allclose(total, expected_sum(comm.size, local.size), rtol=RTOL))
    hosts = comm.gather(MPI.Get_processor_name())
    if comm.rank == 0:
        yield seconds, checksum(total), exact, hosts


def spark_mpi_allreduce(arrays, repeat: int) -> tuple[float, list[str]]:
    """Median seconds of ``MPI_Allreduce`` over the cached ``arrays`` (one per rank) inside ranks
    started by :func:`run_mpi`, and the node each rank ran on; WrongSum if the sum is wrong."""
    from sparkmpi import run_mpi

    ranks = arrays.getNumPartitions()
    size = arrays.first().size
    ((seconds, mpi_sum, elementwise, hosts),) = run_mpi(
        arrays, partial(_allreduce_in_ranks, repeat), output=None
    ).collect()
    _check("Spark-MPI", mpi_sum, checksum(expected_sum(ranks, size)))
    if not elementwise:
        raise WrongSum("Spark-MPI: element-wise sum differs")
    return seconds, hosts


def cached_arrays(spark, ranks: int, size: int):
    """``ranks`` arrays of ``size`` float32, one per partition, cached on the executors."""
    sc = spark.sparkContext
    arrays = sc.parallelize(range(ranks), ranks).map(partial(_make, size)).cache()
    arrays.count()
    return arrays


def local_mpiexec(mpiexec: str) -> Callable[[list[str]], list[str]]:
    """``mpiexec`` on this host, wherever the Spark ranks ran."""
    return lambda hosts: [mpiexec]


def _allreduce_once(comm, rows):
    (local,) = list(rows)
    total = np.empty_like(local)
    comm.Allreduce(local, total)
    if comm.rank == 0:
        yield checksum(total)


def measure(
    spark,
    ranks: int,
    size: int,
    repeat: int,
    mpiexec: Callable[[list[str]], list[str]],
    rounds: int = ROUNDS,
) -> dict:
    """One row of the table: median seconds of each approach for ``ranks`` arrays of ``size``.

    ``mpiexec(hosts)`` is the ``mpiexec`` command (without ``-n``) that places ranks on the
    nodes the Spark ranks ran on (``hosts[r]``: rank ``r``'s node)."""
    from sparkmpi import run_mpi

    arrays = cached_arrays(spark, ranks, size)
    exact = expected_sum(ranks, size)
    expected = checksum(exact)
    row: dict = {"ranks": ranks, "size": size, "oversubscribed": ranks > (os.cpu_count() or 1)}

    def collect_and_sum():
        return np.sum(arrays.collect(), axis=0)

    row["collect_s"], total = _median_time(collect_and_sum, repeat)
    _check("collect", checksum(total), expected)
    if not np.allclose(total, exact, rtol=RTOL):
        raise WrongSum("collect: element-wise sum differs")

    row["tree_reduce_s"], total = _median_time(lambda: arrays.treeReduce(np.add), repeat)
    _check("treeReduce", checksum(total), expected)

    hosts: list[str] = []

    def in_spark_ranks() -> float:
        seconds, where = spark_mpi_allreduce(arrays, repeat)
        hosts[:] = where
        return seconds

    def under_mpiexec() -> float:
        cmd = [*mpiexec(hosts), "-n", str(ranks), sys.executable, "-m", KERNEL]
        cmd += [str(size), str(repeat)]
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL, check=True
        )
        result = json.loads(done.stdout.strip().splitlines()[-1])
        _check("mpiexec", result["checksum"], expected)
        return result["seconds"]

    # The two collective timings alternate, each after an idle pause, and the median of the
    # rounds is kept: on a small, noisy machine drift would otherwise favour one of them.
    spark_mpi, plain = [], []
    for _ in range(rounds):
        time.sleep(SETTLE_S)
        spark_mpi.append(in_spark_ranks())
        time.sleep(SETTLE_S)
        plain.append(under_mpiexec())
    row["mpi_allreduce_s"] = statistics.median(spark_mpi)
    row["mpiexec_allreduce_s"] = statistics.median(plain)

    def end_to_end():
        out = run_mpi(arrays, _allreduce_once, output=None)
        (value,) = out.collect()
        out.unpersist()
        return value

    row["mpi_end_to_end_s"], value = _median_time(end_to_end, max(1, min(repeat, 5)))
    _check("Spark-MPI end to end", value, expected)
    row["sums_agree"] = True
    row["hosts"] = hosts
    row["nodes"] = len(set(hosts))
    row["driver_worker_over_mpi"] = row["collect_s"] / row["mpi_allreduce_s"]
    row["mpi_over_mpiexec"] = row["mpi_allreduce_s"] / row["mpiexec_allreduce_s"]
    arrays.unpersist()
    return row


def _make(size: int, index: int) -> np.ndarray:
    return make_array(index, size)


def table_rows(results: list[dict]) -> tuple[list[str], list[list[object]]]:
    """The Table I layout: approaches down, rank counts across, then the two ratios."""
    columns = ["approach"] + [
        f"N={r['ranks']}" + (" (oversubscribed)" if r["oversubscribed"] else "") for r in results
    ]
    rows: list[list[object]] = [[label] + [r[key] for r in results] for key, label in APPROACHES]
    rows.append(["driver-worker ÷ Spark-MPI"] + [r["driver_worker_over_mpi"] for r in results])
    rows.append(["Spark-MPI ÷ mpiexec"] + [r["mpi_over_mpiexec"] for r in results])
    return columns, rows


def draw_table(ax, results: list[dict], where: str = "") -> None:
    """Table I on ``ax``: seconds per approach against N, with the paper's figures."""
    ns = [r["ranks"] for r in results]
    for key, label in APPROACHES:
        ax.plot(ns, [r[key] for r in results], marker="o", label=label)
    for key, label in (("collect_s", "paper: collect"), ("mpi_allreduce_s", "paper: Spark-MPI")):
        paper = PAPER_TABLE_I[key]
        ax.plot(
            list(paper), list(paper.values()), linestyle=":", marker="x", color="gray", label=label
        )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("ranks / workers N (log scale)")
    ax.set_ylabel("seconds, median (log scale)")
    ax.set_title(f"Sum of N arrays of {results[0]['size']:,} float32{where}", fontsize=10)
    ax.legend(fontsize=7)


def plot(path: str | None, results: list[dict], extra: dict | None = None) -> None:
    """Table I as a PNG; with a link check (runs on namespace nodes), a second panel."""
    if not path:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    check = (extra or {}).get("link_check") or []
    cluster = (extra or {}).get("cluster")
    fig, axes = plt.subplots(1, 2 if check else 1, figsize=(12 if check else 7, 4.5), dpi=120)
    ax = axes[0] if check else axes
    where = f" on {len(cluster['nodes'])} nodes, {cluster['link_rate']} links" if cluster else ""
    draw_table(ax, results, where)
    if check:
        from sparkmpi.bench.allreduce_nodes import draw_link_check

        draw_link_check(axes[1], check)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run_table(spark, ranks: list[int], size: int, repeat: int, mpiexec, rounds: int) -> list[dict]:
    """One :func:`measure` row per rank count, with a progress bar."""
    results = []
    with Progress() as progress:
        task = progress.add_task("Allreduce benchmark", total=len(ranks))
        for n in ranks:
            progress.update(task, description=f"N={n}, {size:,} float32 per rank")
            results.append(measure(spark, n, size, repeat, mpiexec, rounds))
            progress.advance(task)
    return results


def report(args: argparse.Namespace, results: list[dict], repeat: int, **extra: object) -> None:
    """The table on the terminal, the JSON and the plot."""
    size = results[0]["size"]
    columns, rows = table_rows(results)
    print_table(
        f"Sum of N arrays of {size:,} float32 — seconds (median of {repeat})", columns, rows
    )
    data = {
        "results": results,
        "repeat": repeat,
        "cpu_count": os.cpu_count(),
        "paper_table_i": PAPER_TABLE_I,
    }
    write_json(args.json, {**data, **extra})
    plot(args.plot, results, extra)


def main(args: argparse.Namespace) -> int:
    from sparkmpi.runner.context import spark_session
    from sparkmpi.runner.runtime import get_runtime

    on_nodes = bool(args.netns or args.cluster)
    listed = args.ranks or ("1,2,3" if on_nodes else "1,2,4,8")
    ranks = [1, 2] if args.quick else [int(n) for n in listed.split(",")]
    size = 20_000 if args.quick else args.size
    repeat = 3 if args.quick else args.repeat
    rounds = 1 if args.quick else ROUNDS
    if min(ranks) < 1 or size < 1 or repeat < 1:
        print("spark-mpi bench allreduce: ranks, size and repeat must be positive", file=sys.stderr)
        return 2
    mpiexec = str(get_runtime("mpich").mpiexec)
    try:
        if on_nodes:
            from sparkmpi.bench.allreduce_nodes import run_on_nodes

            results, extra = run_on_nodes(args, ranks, size, repeat, rounds, mpiexec)
        else:
            spark = spark_session(args.master, cores=max(ranks), app_name="bench allreduce")
            try:
                results = run_table(spark, ranks, size, repeat, local_mpiexec(mpiexec), rounds)
            finally:
                spark.stop()
            extra = {}
    except WrongSum as exc:
        print(f"spark-mpi bench allreduce: wrong result: {exc}", file=sys.stderr)
        return 1
    except (ValueError, RuntimeError, OSError) as exc:
        print(f"spark-mpi bench allreduce: {exc}", file=sys.stderr)
        return 1
    report(args, results, repeat, **extra)
    return 0
