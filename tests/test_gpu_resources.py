"""GPUs from Spark's resource scheduling: each rank sees its task's GPUs as
``CUDA_VISIBLE_DEVICES``, the driver warns when ranks share one, and local mode, which cannot
schedule them, is refused at once. No GPU is needed: Spark does not check that the addresses a
worker's discovery script reports are real GPUs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from helpers import gpu_worker_cluster
from sparkmpi import run_mpi
from sparkmpi.deploy.standalone import spark_env

WARNING = "sparkmpi: warning: MPI job"

CLUSTER_DRIVER = """
import json, sys, time

import psutil
from pyspark.sql import SparkSession

from sparkmpi import run_mpi

master, worker_pid = sys.argv[1], int(sys.argv[2])


def rank_view(comm, rows):
    import os, sys
    yield comm.rank, os.environ.get("CUDA_VISIBLE_DEVICES"), "--spare" in sys.argv


def session(executor_gpus, task_gpus):
    builder = SparkSession.builder.master(master).appName("gpu test")
    settings = {
        "spark.driver.host": "127.0.0.1", "spark.driver.bindAddress": "127.0.0.1",
        "spark.executor.cores": "2", "spark.executor.memory": "512m", "spark.cores.max": "2",
        "spark.pyspark.python": sys.executable, "spark.ui.enabled": "false",
        "spark.executor.resource.gpu.amount": executor_gpus,
        "spark.task.resource.gpu.amount": task_gpus,
    }
    for key, value in settings.items():
        builder = builder.config(key, value)
    return builder.getOrCreate()


def spares():
    found = 0
    for proc in psutil.Process(worker_pid).children(recursive=True):
        try:
            found += proc.name() == "sparkmpi-spare"
        except psutil.Error:
            pass
    return found


def report(name, rdd):
    print("RESULT", name, json.dumps(sorted(rdd.collect())), sep="\t", flush=True)


spark = session("2", "1")
report("fresh", run_mpi(spark, rank_view, ranks=2, output=None))
deadline = time.monotonic() + 120  # each task's Python worker starts a spare after its rank
while spares() < 2 and time.monotonic() < deadline:
    time.sleep(0.2)
report("spare", run_mpi(spark, rank_view, ranks=2, output=None))
env = {"CUDA_VISIBLE_DEVICES": "7"}
report("user env", run_mpi(spark, rank_view, ranks=2, env=env, output=None))
spark.stop()
print("SHARING", flush=True)
print("SHARING", file=sys.stderr, flush=True)
spark = session("1", "0.5")
report("shared", run_mpi(spark, rank_view, ranks=2, output=None))
spark.stop()
"""

LOCAL_DRIVER = """
import sys

from sparkmpi import MPISession, run_mpi
from sparkmpi.runner import MPIJobError
from sparkmpi.runner.context import spark_session

conf = {"spark.executor.resource.gpu.amount": "1", "spark.task.resource.gpu.amount": "1"}
spark = spark_session("local[2]", conf=conf)
for start in (
    lambda: run_mpi(spark, lambda comm, rows: [comm.rank], ranks=2, output=None),
    lambda: MPISession(spark, 2, output=None),
):
    try:
        start()
        print("STARTED", flush=True)
    except MPIJobError as exc:
        kinds = [cls.__name__ for cls in type(exc).__mro__]
        print("ERROR", " ".join(kinds), "|", str(exc).replace(chr(10), "<newline>"), flush=True)
spark.stop()
"""


def results(stdout: str) -> dict[str, list]:
    """The ``RESULT<tab>name<tab>json`` lines a driver printed, by name."""
    found = {}
    for line in stdout.splitlines():
        if line.startswith("RESULT\t"):
            _, name, data = line.split("\t")
            found[name] = json.loads(data)
    return found


@pytest.fixture(scope="module")
def gpu_cluster(tmp_path_factory):
    """A standalone master and one 2-core worker that advertises two (pretend) GPUs."""
    cluster = gpu_worker_cluster(tmp_path_factory.mktemp("gpu-cluster"), 1, 2, ["0", "1"])
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_each_rank_sees_its_own_spark_assigned_gpu(gpu_cluster, tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(CLUSTER_DRIVER)
    done = subprocess.run(
        [sys.executable, str(driver), gpu_cluster.url, str(gpu_cluster.pids["worker0"])],
        env=gpu_cluster.env,
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    out = results(done.stdout)
    # task amount 1 of the executor's 2 GPUs: one distinct address per rank
    fresh = out["fresh"]
    assert [rank for rank, _, _ in fresh] == [0, 1]
    assert sorted(gpus for _, gpus, _ in fresh) == ["0", "1"]
    # ranks handed to pre-started interpreters get their GPU in the environment sent to them
    spare = out["spare"]
    assert any(from_spare for _, _, from_spare in spare), spare
    assert sorted(gpus for _, gpus, _ in spare) == ["0", "1"]
    # the user's own CUDA_VISIBLE_DEVICES wins
    assert [gpus for _, gpus, _ in out["user env"]] == ["7", "7"]
    # task amount 0.5 of the executor's one GPU: both ranks on it, and one warning says so
    shared = out["shared"]
    address = shared[0][1]
    assert address in ("0", "1") and [gpus for _, gpus, _ in shared] == [address, address]
    before, _, after = done.stderr.partition("SHARING\n")
    assert WARNING not in before
    warnings = [line for line in after.splitlines() if line.startswith(WARNING)]
    assert len(warnings) == 1, after[-3000:]
    assert f"{socket.gethostname()}: GPU {address} (ranks 0, 1)" in warnings[0]


@pytest.mark.timeout(300)
def test_local_mode_with_gpu_task_resources_is_refused_before_any_job(tmp_path):
    driver = tmp_path / "local_driver.py"
    driver.write_text(LOCAL_DRIVER)
    done = subprocess.run(
        [sys.executable, str(driver)],
        env=spark_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    errors = [line for line in done.stdout.splitlines() if line.startswith(("ERROR", "STARTED"))]
    assert len(errors) == 2, done.stdout[-3000:]
    for line in errors:
        kinds, _, message = line[len("ERROR ") :].partition(" | ")
        assert line.startswith("ERROR UnschedulableResourcesError"), line
        assert "ValueError" in kinds.split() and "MPIJobError" in kinds.split()
        assert message.startswith("Spark local mode (local[2]) cannot schedule GPU")
        assert "spark.task.resource.gpu.amount=1" in message
        assert "local-cluster" in message and "<newline>" not in message


def cuda_visible_devices(comm, rows):
    yield comm.rank, os.environ.get("CUDA_VISIBLE_DEVICES")


def test_without_gpu_resources_the_ranks_environment_is_left_alone(spark, capfd):
    out = run_mpi(spark, cuda_visible_devices, ranks=2, output=None).collect()
    inherited = os.environ.get("CUDA_VISIBLE_DEVICES")
    assert out == [(0, inherited), (1, inherited)]
    assert WARNING not in capfd.readouterr().err
