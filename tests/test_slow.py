"""Heavy tests (CI's second step): Intel MPI, a real standalone cluster, the benchmarks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import gpu_worker_cluster, run_bench, run_command
from sparkmpi import run_mpi

pytestmark = pytest.mark.slow


def library_and_sum(comm, rows):
    from mpi4py import MPI

    local = np.full(1000, comm.rank + 1.0)
    total = np.empty_like(local)
    comm.Allreduce(local, total)
    yield comm.rank, MPI.Get_library_version().splitlines()[0], float(total[0])


def test_intel_mpi_joins_the_same_pmi_server(spark):
    out = run_mpi(spark, library_and_sum, ranks=2, runtime="impi", output=None).collect()
    assert [r for r, _, _ in out] == [0, 1]
    assert all("Intel(R) MPI Library" in lib for _, lib, _ in out)
    assert all(total == 3.0 for _, _, total in out)


def test_mpich_is_the_default(spark):
    out = run_mpi(spark, library_and_sum, ranks=2, output=None).collect()
    assert all("MPICH" in lib and total == 3.0 for _, lib, total in out)


def library_sum_and_gpus(comm, rows):
    import os

    for rank, library, total in library_and_sum(comm, rows):
        yield rank, library, total, os.environ.get("CUDA_VISIBLE_DEVICES")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A standalone master and two 1-core workers on loopback, each with one (pretend) GPU."""
    cluster = gpu_worker_cluster(tmp_path_factory.mktemp("standalone"), 2, 1, ["0"])
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.mark.timeout(420)
def test_standalone_cluster_runs_a_two_rank_job_with_spark_assigned_gpus(cluster):
    code = f"""
import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_slow import library_sum_and_gpus
from sparkmpi import run_mpi
from pyspark.sql import SparkSession
spark = (SparkSession.builder.master({cluster.url!r}).appName("standalone test")
         .config("spark.driver.host", "127.0.0.1").config("spark.driver.bindAddress", "127.0.0.1")
         .config("spark.executor.cores", "1").config("spark.executor.memory", "512m")
         .config("spark.cores.max", "2").config("spark.pyspark.python", sys.executable)
         .config("spark.executor.resource.gpu.amount", "1")
         .config("spark.task.resource.gpu.amount", "1")
         .config("spark.ui.enabled", "false").getOrCreate())
out = run_mpi(spark, library_sum_and_gpus, ranks=2, output=None).collect()
print("RESULT", out)
spark.stop()
"""
    done = subprocess.run(
        [sys.executable, "-c", code], env=cluster.env, capture_output=True, text=True, timeout=360
    )
    assert done.returncode == 0, done.stderr[-4000:]
    line = next(ln for ln in done.stdout.splitlines() if ln.startswith("RESULT"))
    out = eval(line[len("RESULT ") :])
    assert [(r, total, gpus) for r, _, total, gpus in out] == [(0, 3.0, "0"), (1, 3.0, "0")]
    assert all(lib.startswith("MPICH") for _, lib, _, _ in out)


def test_bench_launch_quick(tmp_path):
    done, data = run_bench(
        tmp_path, "launch", "--ranks", "2", "--repeat", "2", "--submissions", "5"
    )
    for key in ("ranks", "spark_job_s", "mpiexec_s", "session_dispatch_s"):
        assert key in data
    assert data["ranks"] == 2
    assert "Spark job / mpiexec" in done.stdout


@pytest.mark.timeout(600)
def test_bench_conformance_spawn_and_dynproc_match_mpiexec(tmp_path):
    """mpi4py's own spawn, dynamic-process and communicator tests give the same outcome, test
    by test and rank by rank, under spark-mpi run and under each library's mpiexec (Open MPI:
    not between jobs, see docs/benchmarks.md)."""
    from sparkmpi.bench.conformance import default_testdir

    if not (default_testdir() / "main.py").exists():
        pytest.skip(f"no mpi4py test suite at {default_testdir()} (scripts/setup.sh)")
    modules = "test_spawn,test_dynproc,test_comm"
    done = run_command(
        [sys.executable, "-m", "sparkmpi.cli", "bench", "conformance", "--modules", modules,
         "--json", str(tmp_path / "c.json"), "--plot", str(tmp_path / "c.png")],
        540,
    )  # fmt: skip
    data = json.loads((tmp_path / "c.json").read_text())
    assert (tmp_path / "c.png").stat().st_size > 1000, done.stderr[-2000:]
    for runtime in ("mpich", "impi"):
        assert data[runtime]["identical"], data[runtime]["modules"]
        assert set(data[runtime]["modules"]) == set(modules.split(","))
    assert data["mpich"]["modules"]["test_spawn"]["spark-mpi"] == {"pass": 44}
    openmpi = data["openmpi"]["modules"]
    assert openmpi["test_comm"]["identical"] and openmpi["test_spawn"]["identical"]


@pytest.mark.timeout(420)
@pytest.mark.parametrize("where", ["local", "standalone"])
def test_bench_allreduce_quick(tmp_path, where, request):
    master, env = [], None
    if where == "standalone":
        cluster = request.getfixturevalue("cluster")
        master, env = ["--master", cluster.url], cluster.env
    done, data = run_bench(tmp_path, "allreduce", "--quick", *master, timeout=400, env=env)
    results = data["results"]
    assert [r["ranks"] for r in results] == [1, 2]
    fields = (
        "ranks",
        "size",
        "collect_s",
        "tree_reduce_s",
        "mpi_allreduce_s",
        "mpi_end_to_end_s",
        "mpiexec_allreduce_s",
    )
    for row in results:
        assert all(isinstance(row[f], (int, float)) and row[f] > 0 for f in fields)
        assert row["sums_agree"] is True
    assert "driver-worker ÷ Spark-MPI" in done.stdout and "Spark-MPI ÷ mpiexec" in done.stdout


def test_bench_tomo_small(tmp_path):
    _, data = run_bench(tmp_path, "tomo", "--size", "48", "--textbook-slices", "1")
    assert data["shape"] == [48, 48, 48] and set(data["art_iteration_s"]) == {"1", "2"}
    assert data["textbook_iteration_s"] > 0 and all(v > 0 for v in data["art_iteration_s"].values())


def test_bench_tomo_scale_small(tmp_path):
    _, data = run_bench(
        tmp_path,
        "tomo",
        "--scale",
        "--sizes",
        "48",
        "--projections",
        "60",
        "--library-slices",
        "2",
    )
    (size,) = data["sizes"]
    assert size["n"] == 48 and size["library"].startswith("ASTRA")
    assert size["ours"]["driver_peak_rss_mib"] > 0 and size["ours"]["rank_peak_rss_mib"] > 0
    for kernel in ("strip", "linear"):
        assert size[f"library_{kernel}"]["relative_rms_vs_ours"] < 0.2  # the same blobs


@pytest.mark.timeout(300)
def test_tomo_reconstruct_on_the_standalone_cluster(cluster, tmp_path):
    from sparkmpi.apps.tomo.volume import read_volume

    tif, out = tmp_path / "tilt.tif", tmp_path / "volume.npy"
    cli = [sys.executable, "-m", "sparkmpi.cli", "tomo"]
    simulate = [*cli, "simulate", str(tif), "--size", "32", "--phantom", str(tmp_path / "p.npy")]
    done = subprocess.run(simulate, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    reconstruct = [*cli, "reconstruct", str(tif), str(out), "--master", cluster.url, "--ranks", "2"]
    done = subprocess.run(reconstruct, capture_output=True, text=True, timeout=240, env=cluster.env)
    assert done.returncode == 0, done.stderr[-3000:]
    phantom, volume = np.load(tmp_path / "p.npy"), read_volume(out)
    assert volume.shape == phantom.shape == (32, 32, 32)
    assert np.corrcoef(volume.ravel(), phantom.ravel())[0, 1] > 0.8


@pytest.mark.timeout(300)
def test_ptycho_one_two_and_four_ranks_agree(spark):
    from sparkmpi.apps.ptycho.pipeline import reconstruct
    from sparkmpi.apps.ptycho.simulate import simulate
    from sparkmpi.apps.ptycho.solver import SolverSettings

    scan = simulate(64, 64)
    settings = SolverSettings("raar", 20)
    runs = {
        r: reconstruct(spark, scan, settings, ranks=r, output=lambda *a: None)[0] for r in (1, 2, 4)
    }
    lit = runs[1].illumination > 0.5 * runs[1].illumination.max()
    for r in (2, 4):
        np.testing.assert_allclose(runs[r].object[lit], runs[1].object[lit], atol=1e-4)
        np.testing.assert_allclose(runs[r].errors, runs[1].errors, rtol=1e-4)


def test_bench_ptycho_quick(tmp_path):
    _, data = run_bench(tmp_path, "ptycho", "--quick")
    assert (data["frames"], data["frame_size"], data["iterations"]) == (64, 64, 10)
    assert set(data["seconds"]) == {"1", "2"} and data["fft_bound_s"] > 0
    assert all(e < 0.2 for e in data["phase_error_rad"].values())


@pytest.mark.timeout(400)
def test_bench_stream_quick(tmp_path):
    _, data = run_bench(tmp_path, "stream", "--quick", timeout=380)
    results = data["results"]
    assert [r["transport"] for r in results] == ["kafka", "zmq"]
    for r in results:
        assert r["frames"] == 64 and r["frames_lost"] == 0 and r["frames_applied_twice"] == 0
        assert r["last_frame_to_result_s"] > 0 and r["max_rate_hz"] > 0


@pytest.mark.timeout(600)
def test_bench_stream_faults_quick(tmp_path):
    args = ("--faults", "--quick", "--transports", "zmq", "--batch-interval", "0.5")
    _, data = run_bench(tmp_path, "stream", *args, timeout=580)
    results = {r["fault"]: r for r in data["results"]}
    assert set(results) == {"none", "driver-kill", "rank-kill", "rank-hang"}
    for r in results.values():
        assert r["frames"] == 48 and r["frames_lost"] == 0 and r["frames_applied_twice"] == 0
    assert results["rank-kill"]["recoveries"] == results["rank-hang"]["recoveries"] == 1
    assert all(results[f]["resumed_after_s"] > 0 for f in ("driver-kill", "rank-kill"))


def test_bench_stream_tomo_quick(tmp_path):
    _, data = run_bench(tmp_path, "stream-tomo", "--quick")
    assert (data["size"], data["projections"]) == (48, 91)
    assert data["frames_lost"] == 0 and data["frames_applied_twice"] == 0
    assert data["max_difference_from_batch_fbp"] < 1e-4 and data["batches"] >= 1


def test_bench_stream_v2_small(tmp_path):
    _, data = run_bench(tmp_path, "stream-v2", "--frames", "200", "--size", "128")
    assert data["frames"] == 200 and data["raw_images_per_s"] > 0
    for run in (data["pipeline"], data["pipeline_ranks"]):
        assert run["rate"] > 0 and run["lost"] == 0 and run["malformed"] == 0
