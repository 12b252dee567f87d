"""MPI jobs across the nodes of a network-namespace cluster: layouts, TCP between nodes,
network and process faults, a driver with two addresses (root only; slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from helpers import run_bench
from sparkmpi.bench import faults

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SPARK_MPI_RUN = [sys.executable, "-m", "sparkmpi.cli", "run", "--np"]
UNREACHABLE = "10.79.0.1"  # a second address of the driver's host that no node reaches

# cores.max spreads a job over the workers one core at a time (nodes have 2, 1 and 1 cores)
LAYOUTS = {
    "2 nodes": (2, {"spark.cores.max": "2"}, [1, 1]),
    "3 nodes": (3, {"spark.cores.max": "3"}, [1, 1, 1]),
    "2+1+1 on 3 nodes": (4, {"spark.cores.max": "4"}, [1, 1, 2]),
}
SCRIPT = """
import socket
from mpi4py import MPI
comm = MPI.COMM_WORLD
total = comm.allreduce(comm.rank + 1)
print("WHERE", comm.rank, MPI.Get_processor_name(), socket.gethostname(), total, flush=True)
"""


def driver_env(cluster, **extra: str) -> dict[str, str]:
    env = {**os.environ, **cluster.env, **extra}
    return {k: v for k, v in env.items() if v is not None}


def run_job(cluster, ranks: int, conf: dict, *flags: str, env=None) -> dict:
    pairs = [f"{k}={v}" for k, v in {"spark.executor.memory": "512m", **conf}.items()]
    done = subprocess.run(
        [sys.executable, str(HERE / "multinode_job.py"), cluster.url, str(ranks), *pairs, *flags],
        capture_output=True,
        text=True,
        timeout=300,
        env=env or driver_env(cluster),
    )
    assert done.returncode == 0, done.stderr[-4000:]
    line = next(ln for ln in done.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def check_layout(cluster, placed: list[tuple[int, str, str]], ranks: int, per_node: list[int]):
    """Every rank's processor name is its node's, the nodes and ranks per node are as expected."""
    names = {node.name for node in cluster.nodes}
    assert [rank for rank, _, _ in placed] == list(range(ranks))
    for _, processor, hostname in placed:
        assert processor == hostname and processor in names
    assert sorted(Counter(p for _, p, _ in placed).values()) == per_node


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_run_mpi_and_a_session_across_nodes(netns_cluster, layout):
    ranks, conf, per_node = LAYOUTS[layout]
    out = run_job(netns_cluster, ranks, conf)
    total = ranks * (ranks + 1) / 2
    check_layout(netns_cluster, [tuple(r[:3]) for r in out["run_mpi"]], ranks, per_node)
    assert all(r[3] == total for r in out["run_mpi"])
    first, second = out["session"]
    check_layout(netns_cluster, [(r, p, p) for r, p, _ in first], ranks, per_node)
    assert [s for _, _, s in first] == [total] * ranks
    assert [s for _, _, s in second] == [10 * ranks] * ranks
    assert out["pmi_bind"] == out["pmi_advertised"] == netns_cluster.bridge_address


@pytest.mark.parametrize(
    ("layout", "runtime"),
    [("2 nodes", "mpich"), ("2+1+1 on 3 nodes", "mpich"), ("2+1+1 on 3 nodes", "openmpi")],
)
def test_spark_mpi_run_across_nodes(netns_cluster, layout, runtime, tmp_path):
    ranks, conf, per_node = LAYOUTS[layout]
    script = tmp_path / "where.py"
    script.write_text(SCRIPT)
    options = [arg for k, v in conf.items() for arg in ("--conf", f"{k}={v}")]
    options += ["--runtime", runtime]
    done = subprocess.run(
        [*SPARK_MPI_RUN, str(ranks), "--master", netns_cluster.url, *options, str(script)],
        capture_output=True,
        text=True,
        timeout=300,
        env=driver_env(netns_cluster),
    )
    assert done.returncode == 0, done.stderr[-4000:]
    where = [ln.split()[3:] for ln in done.stdout.splitlines() if " WHERE " in ln]
    placed = sorted((int(r), p, h) for r, p, h, _ in where)
    check_layout(netns_cluster, placed, ranks, per_node)
    assert {int(total) for *_, total in where} == {ranks * (ranks + 1) // 2}


def test_ranks_on_two_nodes_use_the_network_and_on_one_node_shared_memory(netns_cluster):
    cluster = netns_cluster
    payload = 20 * 4 * (1 << 20)  # ALLREDUCES x 4 MB in multinode_job
    before = {n.name: cluster.link_bytes(n) for n in cluster.nodes}
    out = run_job(cluster, 2, {"spark.cores.max": "2"}, "--run-mpi-only")
    used = {p for _, p, _, _ in out["run_mpi"]}
    assert len(used) == 2
    for node in cluster.nodes:
        if node.name in used:
            assert cluster.link_bytes(node) - before[node.name] > payload / 2
    # one executor of two cores fits only the first node: both ranks there, over shared memory
    before = cluster.link_bytes(cluster.nodes[0])
    within = {"spark.cores.max": "2", "spark.executor.cores": "2"}
    out = run_job(cluster, 2, within, "--run-mpi-only")
    assert {p for _, p, _, _ in out["run_mpi"]} == {cluster.nodes[0].name}
    assert cluster.link_bytes(cluster.nodes[0]) - before < payload / 8


def check_fault(result: dict, *, victim: bool = True) -> None:
    """The job failed with one MPIJobError naming a rank and its node, and left nothing."""
    assert result["event"] == "failed", result
    assert result["rank"] is not None and result["host"], result
    assert result["message"].startswith(f"MPI rank {result['rank']} of "), result
    assert f" on {result['host']} failed: " in result["message"], result
    if victim:
        assert (result["rank"], result["host"]) == (result["victim_rank"], result["victim_node"])
    assert not result["left_over"], result


@pytest.mark.parametrize("fault", ["link-down", "task-killed", "worker-killed", "helper-child"])
def test_a_fault_under_a_busy_job_fails_it_naming_the_rank_and_node(netns_cluster, fault):
    result = faults.FAULTS[fault](netns_cluster)
    check_fault(result)
    assert result["since_inject"] < 30  # a hang guard; the benchmark reports the real times
    netns_cluster.wait_for_workers(len(netns_cluster.nodes), 120)


def test_a_node_that_cannot_reach_the_pmi_port_is_named_with_the_address(netns_cluster):
    result = faults.pmi_port_filtered(netns_cluster)
    check_fault(result, victim=False)
    assert result["host"] == result["blocked_node"]
    assert f"cannot reach the PMI server at {netns_cluster.bridge_address}:" in result["message"]


def add_unreachable_address(cluster) -> None:
    if UNREACHABLE + "/24" not in cluster.extra_addresses:
        cluster.add_root_address(UNREACHABLE + "/24")


def test_a_driver_with_two_addresses_listens_where_the_executors_reach_it(netns_cluster):
    cluster = netns_cluster
    add_unreachable_address(cluster)
    # no SPARK_LOCAL_IP: the driver must find the address on the route to the master itself
    env = driver_env(cluster)
    env.pop("SPARK_LOCAL_IP", None)
    out = run_job(cluster, 2, {"spark.cores.max": "2"}, "--run-mpi-only", env=env)
    assert out["driver_host"] == cluster.bridge_address
    assert out["pmi_bind"] == out["pmi_advertised"] == cluster.bridge_address
    # told to listen where no node reaches: one clear error naming that address
    result = faults.wrong_pmi_host(cluster, UNREACHABLE)
    check_fault(result, victim=False)
    assert f"at {UNREACHABLE}:" in result["message"]


def test_spark_mpi_run_with_a_wrong_pmi_host_says_which_address(netns_cluster, tmp_path):
    add_unreachable_address(netns_cluster)
    script = tmp_path / "where.py"
    script.write_text(SCRIPT)
    options = ["--conf", "spark.cores.max=2", "--pmi-host", UNREACHABLE]
    done = subprocess.run(
        [*SPARK_MPI_RUN, "2", "--master", netns_cluster.url, *options, str(script)],
        capture_output=True,
        text=True,
        timeout=300,
        env=driver_env(netns_cluster),
    )
    assert done.returncode == 1
    error = done.stderr.strip().splitlines()[-1]
    assert error.startswith("spark-mpi run: MPI rank ") and f"at {UNREACHABLE}:" in error


def test_bench_allreduce_quick_across_nodes(netns_cluster, tmp_path):
    _, data = run_bench(
        tmp_path, "allreduce", "--quick", "--cluster", str(netns_cluster.state_dir), timeout=500
    )
    rows = data["results"]
    assert [r["nodes"] for r in rows] == [1, 2]
    assert all(r["sums_agree"] and r["mpiexec_allreduce_s"] > 0 for r in rows)
    assert data["provenance"]["commit"]


def test_bench_faults_on_the_cluster(netns_cluster, tmp_path):
    _, data = run_bench(
        tmp_path,
        "faults",
        "--cluster",
        str(netns_cluster.state_dir),
        "--faults",
        "task-killed",
        "--flood-connections",
        "300",
        timeout=500,
    )
    (fault,) = data["faults"]
    check_fault(fault)
    floods = data["floods"]
    assert floods["job_during_flood"] == "ok"
    assert floods["fds"]["after"] - floods["fds"]["before"] < 20
