"""Table I across the nodes of a namespace cluster: ``spark-mpi bench allreduce --netns N``.

The driver runs in the root namespace, one Spark worker per node (one core each for the table,
so N ranks land on N nodes), and ``mpiexec`` launches the same kernel on the same nodes through
the cluster's launcher wrapper, so both MPI timings cross the same emulated links.

A *link check* then shows that ranks on different nodes talk over the (shaped) network and ranks
on one node through shared memory: the Allreduce of two ranks on two nodes is timed with the
node links at the benchmark's rate and at a tenth of it, and so is the Allreduce of two ranks on
one node (its executor has both cores); only the first should change.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator

from sparkmpi.bench.allreduce import cached_arrays, run_table, spark_mpi_allreduce
from sparkmpi.deploy.links import rate_bits
from sparkmpi.deploy.netns import NetnsCluster


def slower_rate(rate: str, factor: int = 10) -> str:
    """``rate`` (tc syntax, e.g. ``10gbit``) divided by ``factor``, in tc syntax."""
    return f"{max(1, round(rate_bits(rate) / factor / 1e6))}mbit"


@contextlib.contextmanager
def bench_cluster(args: argparse.Namespace) -> Iterator[NetnsCluster]:
    """The cluster named by ``--cluster``, or a fresh one of ``--netns`` nodes (the first with
    two cores, for the link check), torn down afterwards."""
    if args.cluster:
        yield NetnsCluster.load(args.cluster)
        return
    with tempfile.TemporaryDirectory(prefix="bench-netns-") as state:
        nodes = args.netns
        cluster = NetnsCluster(
            state,
            nodes=nodes,
            cores=[2] + [1] * (nodes - 1),
            prefix="sbench",
            subnet=args.subnet,
            rate=args.rate,
            delay=args.delay,
        )
        cluster.start()
        try:
            yield cluster
        finally:
            cluster.stop()


def mpiexec_on(cluster: NetnsCluster, mpiexec: str) -> Callable[[list[str]], list[str]]:
    """``mpiexec`` placing as many ranks on each node as the Spark ranks had there."""

    def command(hosts: list[str]) -> list[str]:
        placed = [f"{host}:{count}" for host, count in Counter(hosts).items()]
        return [mpiexec, *cluster.mpiexec_args(placed)]

    return command


def _session(cluster: NetnsCluster, executor_cores: int, cores_max: int):
    from sparkmpi.runner.context import spark_session

    conf = {
        "spark.executor.cores": str(executor_cores),
        "spark.cores.max": str(cores_max),
        "spark.executor.memory": "1g",
    }
    return spark_session(cluster.url, conf=conf, app_name="bench allreduce (nodes)")


def link_check(
    cluster: NetnsCluster, size: int, repeat: int, rate: str, delay: str | None
) -> list[dict]:
    """Allreduce seconds of 2 ranks across two nodes and within one, at ``rate`` and at a tenth."""
    rows = []
    for where, executor_cores in (("two nodes", 1), ("one node", 2)):
        spark = _session(cluster, executor_cores, 2)
        try:
            arrays = cached_arrays(spark, 2, size)
            for link in (rate, slower_rate(rate)):
                cluster.shape(link, delay)
                seconds, hosts = spark_mpi_allreduce(arrays, repeat)
                rows.append({"ranks": where, "link_rate": link, "seconds": seconds, "hosts": hosts})
        finally:
            cluster.shape(rate, delay)
            spark.stop()
    return rows


def draw_link_check(ax, rows: list[dict]) -> None:
    """Bars: Allreduce seconds of two ranks on two nodes and on one, per link rate."""
    rates = list(dict.fromkeys(r["link_rate"] for r in rows))
    places = list(dict.fromkeys(r["ranks"] for r in rows))
    width = 0.8 / len(rates)
    for i, rate in enumerate(rates):
        values = [
            next(r["seconds"] for r in rows if (r["ranks"], r["link_rate"]) == (p, rate))
            for p in places
        ]
        xs = [x + i * width for x in range(len(places))]
        bars = ax.bar(xs, [v * 1e3 for v in values], width, label=f"node links at {rate}")
        for bar, value in zip(bars, values, strict=True):
            ax.annotate(
                f"{value * 1e3:.1f} ms",
                (bar.get_x() + bar.get_width() / 2, value * 1e3),
                ha="center",
                va="bottom",
                fontsize=8,
            )
    ax.set_xticks([x + width * (len(rates) - 1) / 2 for x in range(len(places))])
    ax.set_xticklabels([f"2 ranks on {p}" for p in places])
    ax.set_ylabel("Spark-MPI Allreduce, ms (median)")
    ax.set_title(
        "Between nodes: TCP through the shaped link; within one: shared memory", fontsize=10
    )
    ax.legend(fontsize=8)


def run_on_nodes(
    args: argparse.Namespace,
    ranks: list[int],
    size: int,
    repeat: int,
    rounds: int,
    mpiexec: str,
) -> tuple[list[dict], dict]:
    """Table I rows for ``ranks`` on the cluster's nodes, and the link check and cluster facts
    to record beside them."""
    saved = dict(os.environ)
    with bench_cluster(args) as cluster:
        if max(ranks) > len(cluster.nodes):
            raise ValueError(f"{max(ranks)} ranks need as many nodes; the cluster has fewer")
        os.environ.update(cluster.env)
        try:
            spark = _session(cluster, 1, max(ranks))
            try:
                results = run_table(
                    spark, ranks, size, repeat, mpiexec_on(cluster, mpiexec), rounds
                )
            finally:
                spark.stop()
            check = [] if args.quick else link_check(cluster, size, repeat, args.rate, args.delay)
        finally:
            os.environ.clear()
            os.environ.update(saved)
        extra = {
            "cluster": {
                "nodes": [
                    {"name": n.name, "address": n.address, "cores": n.cores} for n in cluster.nodes
                ],
                "link_rate": args.rate,
                "link_delay": args.delay,
            },
            "link_check": check,
        }
    return results, extra
