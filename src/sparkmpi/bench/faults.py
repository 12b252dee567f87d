"""Network and process faults under a running MPI job on a cluster of network namespaces.

Each fault runs :mod:`sparkmpi.bench.fault_driver` in a subprocess against a
:class:`~sparkmpi.deploy.netns.NetnsCluster`, waits until every rank is busy in
``MPI_Allreduce`` (or, for the faults that stop a job from starting, submits it), breaks one
thing, and reports how the job ended, how long after the fault the driver had its
``MPIJobError``, and whether any process of the job was left on any node. The fault benchmark
(``spark-mpi bench faults``) times them; the multi-node tests check what they name and leave.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from sparkmpi.deploy.links import namespace_pids
from sparkmpi.deploy.netns import NetnsCluster, Node
from sparkmpi.deploy.ports import free_port
from sparkmpi.runner.rank import PROCESS_NAME

RANK_NAME = PROCESS_NAME.decode()
DRIVER_TIMEOUT_S = 240.0


class FaultRunError(RuntimeError):
    """The fault could not be staged (the job never got busy, the driver died silently)."""


@dataclass
class DriverRun:
    """One fault driver subprocess against ``cluster``."""

    cluster: NetnsCluster
    ranks: int = 2
    conf: dict[str, str] = field(default_factory=dict)
    pmi_host: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    fail_on: str | None = None
    helper_pid_dir: str | None = None
    proc: subprocess.Popen | None = None
    log: Path | None = None

    def start(self) -> DriverRun:
        command = [sys.executable, "-m", "sparkmpi.bench.fault_driver"]
        command += ["--master", self.cluster.url, "--ranks", str(self.ranks)]
        conf = {"spark.cores.max": str(self.ranks), "spark.executor.memory": "512m", **self.conf}
        for key, value in conf.items():
            command += ["--conf", f"{key}={value}"]
        if self.pmi_host:
            command += ["--pmi-host", self.pmi_host]
        if self.fail_on:
            command += ["--fail-on", self.fail_on]
        if self.helper_pid_dir:
            command += ["--helper-pid-dir", self.helper_pid_dir]
        fd, name = tempfile.mkstemp(prefix="fault-driver-", suffix=".log")
        os.close(fd)
        self.log = Path(name)
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                command,
                env={**self.cluster.env, **self.env},
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                start_new_session=True,
            )
        return self

    def _event(self, timeout: float) -> dict:
        assert self.proc is not None and self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise FaultRunError(f"the fault driver ended without a report: {self.tail()}")
            if line.startswith("{"):
                return json.loads(line)
        raise FaultRunError(f"no report from the fault driver within {timeout:g} s")

    def wait_ready(self, timeout: float = DRIVER_TIMEOUT_S) -> dict[int, dict]:
        """Rank -> {host, pid, ppid} once every rank is busy; FaultRunError otherwise."""
        event = self._event(timeout)
        if event.get("event") != "ready":
            raise FaultRunError(f"the job ended before it was busy: {event}")
        return {int(rank): info for rank, info in event["ranks"].items()}

    def inject(self) -> None:
        """Tells the driver that the fault happens now."""
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write("inject\n")
        self.proc.stdin.flush()

    def result(self, timeout: float = DRIVER_TIMEOUT_S) -> dict:
        event = self._event(timeout)
        assert self.proc is not None
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=60)
        return event

    def tail(self, lines: int = 15) -> str:
        if self.log is None or not self.log.exists():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        if self.log is not None:
            self.log.unlink(missing_ok=True)


def job_processes(cluster: NetnsCluster, helper_pid_dir: str | None = None) -> list[int]:
    """PIDs of rank processes in the cluster's namespaces and of helpers the ranks started."""
    found = []
    for node in cluster.nodes:
        for pid in namespace_pids(node.name):
            with contextlib.suppress(psutil.Error):
                proc = psutil.Process(pid)
                if proc.name() == RANK_NAME and proc.status() != psutil.STATUS_ZOMBIE:
                    found.append(pid)
    if helper_pid_dir:
        for pidfile in Path(helper_pid_dir).glob("helper-*.pid"):
            pid = int(pidfile.read_text())
            with contextlib.suppress(psutil.Error):
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    found.append(pid)
    return found


def seconds_until_clean(
    cluster: NetnsCluster, helper_pid_dir: str | None = None, timeout: float = 60.0
) -> float | None:
    """Seconds until no process of the job is left on any node; None if some still run."""
    start = time.monotonic()
    while job_processes(cluster, helper_pid_dir):
        if time.monotonic() - start > timeout:
            return None
        time.sleep(0.1)
    return time.monotonic() - start


def victim(cluster: NetnsCluster, ranks: dict[int, dict]) -> tuple[int, Node]:
    """The highest rank and its node (the one the fault hits)."""
    rank = max(ranks)
    return rank, cluster.node_of(ranks[rank]["host"])


def _busy_fault(
    cluster: NetnsCluster,
    name: str,
    act: Callable[[int, Node, dict], None],
    *,
    fail_on: str | None = None,
) -> dict:
    with tempfile.TemporaryDirectory(prefix="fault-") as scratch:
        helper_dir = scratch if fail_on else None
        driver = DriverRun(cluster, fail_on=fail_on, helper_pid_dir=helper_dir).start()
        try:
            ranks = driver.wait_ready()
            rank, node = victim(cluster, ranks)
            act(rank, node, ranks[rank])
            driver.inject()
            outcome = driver.result()
        finally:
            driver.close()
        clean = seconds_until_clean(cluster, helper_dir)
    return {
        "fault": name,
        "victim_rank": rank,
        "victim_node": node.name,
        **outcome,
        "left_over": clean is None,
        "clean_after_s": clean,
    }


def link_down(cluster: NetnsCluster) -> dict:
    """A node's link goes down while its rank is in ``MPI_Allreduce``; restored afterwards."""
    downed: list[Node] = []

    def act(rank: int, node: Node, info: dict) -> None:
        cluster.set_link(node, False)
        downed.append(node)

    try:
        return _busy_fault(cluster, "link down", act)
    finally:
        for node in downed:
            cluster.set_link(node, True)


def task_killed(cluster: NetnsCluster) -> dict:
    """The Spark Python worker running a rank's task is SIGKILLed."""

    def act(rank: int, node: Node, info: dict) -> None:
        os.kill(info["ppid"], signal.SIGKILL)

    return _busy_fault(cluster, "Python worker of a task SIGKILLed", act)


def worker_killed(cluster: NetnsCluster) -> dict:
    """A node's Spark worker JVM is SIGKILLed; it is started again afterwards."""
    killed: list[Node] = []

    def act(rank: int, node: Node, info: dict) -> None:
        cluster.kill_worker(node)
        killed.append(node)

    try:
        return _busy_fault(cluster, "worker JVM SIGKILLed", act)
    finally:
        for node in killed:
            cluster.restart_worker(node)


def rank_with_helper_fails(cluster: NetnsCluster) -> dict:
    """A rank that started a child in its own session raises."""

    with tempfile.TemporaryDirectory(prefix="fault-trigger-") as trigger_dir:
        trigger = Path(trigger_dir, "fail")

        def act(rank: int, node: Node, info: dict) -> None:
            trigger.touch()

        name = "rank with a child in its own session fails"
        return _busy_fault(cluster, name, act, fail_on=str(trigger))


def _unreachable(cluster: NetnsCluster, name: str, **run: object) -> dict:
    driver = DriverRun(cluster, **run).start()  # type: ignore[arg-type]
    try:
        outcome = driver.result()
    finally:
        driver.close()
    clean = seconds_until_clean(cluster)
    return {"fault": name, **outcome, "left_over": clean is None, "clean_after_s": clean}


def pmi_port_filtered(cluster: NetnsCluster) -> dict:
    """Packets from one node to the driver's (pinned) PMI port are silently dropped."""
    port = free_port(cluster.bridge_address)
    node = cluster.nodes[-1]
    cluster.block(node, cluster.bridge_address, port)
    try:
        result = _unreachable(
            cluster,
            "PMI port filtered on one node",
            env={"SPARKMPI_PMI_PORT": str(port)},
            ranks=len(cluster.nodes),
        )
    finally:
        cluster.unblock(node)
    return {"blocked_node": node.name, **result}


def wrong_pmi_host(cluster: NetnsCluster, address: str) -> dict:
    """The driver listens on ``address``, an address of it that no node can reach."""
    return {"pmi_host": address, **_unreachable(cluster, "wrong --pmi-host", pmi_host=address)}


FAULTS = {
    "link-down": link_down,
    "task-killed": task_killed,
    "worker-killed": worker_killed,
    "helper-child": rank_with_helper_fails,
    "pmi-filtered": pmi_port_filtered,
}


def _table_rows(results: list[dict]) -> list[list[object]]:
    rows = []
    for r in results:
        seconds = (
            r.get("since_inject") if r.get("since_inject") is not None else r.get("since_submit")
        )
        basis = "after the fault" if r.get("since_inject") is not None else "after submitting"
        named = f"rank {r.get('rank')} on {r.get('host')}" if r.get("event") == "failed" else "-"
        left = "none" if not r.get("left_over") else "SOME"
        rows.append([r["fault"], seconds, basis, named, left])
    return rows


def plot(path: str | None, results: list[dict], floods: dict) -> None:
    """Seconds from each fault to the error; the driver's descriptors and memory in floods."""
    if not path or not (results or floods):
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [p for p in ("faults", "floods") if (results if p == "faults" else floods)]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 3.8), dpi=120)
    axes = [axes] if len(panels) == 1 else list(axes)
    if results:
        ax = axes[panels.index("faults")]
        by_fault: dict[str, list[list]] = {}
        for row in _table_rows(results):
            by_fault.setdefault(row[0], []).append(row)
        labels = [f"{name}\n({rows[0][2]})" for name, rows in by_fault.items()]
        spans = [[r[1] for r in rows] for rows in by_fault.values()]
        medians = [statistics.median(span) for span in spans]
        low = [m - min(span) for m, span in zip(medians, spans, strict=True)]
        high = [max(span) - m for m, span in zip(medians, spans, strict=True)]
        ax.barh(labels, medians, xerr=[low, high], color="#4c72b0", capsize=3)
        ax.axvline(10, color="gray", linestyle=":", label="10 s")
        for y, value in enumerate(medians):
            ax.annotate(f"  {value:.1f} s", (value, y), va="bottom", fontsize=8)
        runs = max(len(rows) for rows in by_fault.values())
        ax.set_xlabel(f"seconds to MPIJobError on the driver (median, range of {runs} runs)")
        ax.invert_yaxis()
        ax.tick_params(axis="y", labelsize=7)
        ax.legend(fontsize=7)
    if floods:
        ax = axes[panels.index("floods")]
        fds, rss = floods["fds"], floods["rss_mb"]
        stages = ["before", "idle flood", "after"]
        ax.plot(
            stages,
            [fds["before"], fds["during_idle_flood_max"], fds["after"]],
            "o-",
            label="descriptors",
        )
        ax.plot(
            stages,
            [rss["before"], rss["during_idle_flood_max"], rss["after"]],
            "s-",
            label="RSS MB",
        )
        ax.axhline(floods["fd_limit"], color="gray", linestyle=":", label="fd limit")
        ax.set_title(f"driver under {floods['idle_connections']} idle connections", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main(args) -> int:
    from sparkmpi.bench.floods import measure_floods
    from sparkmpi.bench.report import print_table, write_json
    from sparkmpi.deploy.netns import netns_unavailable

    names = [n.strip() for n in args.faults.split(",") if n.strip()]
    unknown = [n for n in names if n not in FAULTS and n != "wrong-pmi-host"]
    if unknown:
        print(f"spark-mpi bench faults: unknown fault(s) {', '.join(unknown)}", file=sys.stderr)
        return 2
    floods = measure_floods(args.flood_connections) if args.flood_connections else {}
    results: list[dict] = []
    if names:
        why = netns_unavailable()
        if why:
            print(f"spark-mpi bench faults: network faults need namespaces: {why}", file=sys.stderr)
            return 1
        with _cluster(args) as cluster:
            for name in names:
                for _ in range(args.repeat):
                    if name == "wrong-pmi-host":
                        if WRONG_ADDRESS + "/24" not in cluster.extra_addresses:
                            cluster.add_root_address(WRONG_ADDRESS + "/24")
                        results.append(wrong_pmi_host(cluster, WRONG_ADDRESS))
                    else:
                        results.append(FAULTS[name](cluster))
                    cluster.wait_for_workers(len(cluster.nodes), 120)
    if results:
        columns = ["fault", "seconds", "counted", "MPIJobError names", "job processes left"]
        print_table("Faults under a running MPI job", columns, _table_rows(results))
    if floods:
        fds, rss = floods["fds"], floods["rss_mb"]
        print_table(
            f"Driver under connection floods (fd limit {floods['fd_limit']})",
            ["", "before", "idle flood (max)", "oversized lines (max)", "after"],
            [
                ["descriptors", fds["before"], fds["during_idle_flood_max"], "-", fds["after"]],
                [
                    "RSS MB",
                    rss["before"],
                    rss["during_idle_flood_max"],
                    rss["during_oversized_max"],
                    rss["after"],
                ],
            ],
        )
        print(f"job during the idle flood: {floods['job_during_flood']}")
    write_json(args.json, {"faults": results, "floods": floods})
    plot(args.plot, results, floods)
    return 0


WRONG_ADDRESS = "10.89.0.1"


@contextlib.contextmanager
def _cluster(args):
    """The cluster in ``--cluster``, or a fresh 3-node one torn down afterwards."""
    if args.cluster:
        yield NetnsCluster.load(args.cluster)
        return
    with tempfile.TemporaryDirectory(prefix="bench-faults-") as state:
        cluster = NetnsCluster(state, nodes=3, prefix="sfault", subnet=args.subnet)
        cluster.start()
        try:
            yield cluster
        finally:
            cluster.stop()
