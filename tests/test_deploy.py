"""Deployment: the standalone cluster commands and a real one-node SLURM cluster."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from helpers import spark_mpi
from sparkmpi.deploy.slurm import sbatch_script

ROOT = Path(__file__).resolve().parent.parent
APP = """
from pyspark.sql import SparkSession

from sparkmpi import run_mpi

spark = SparkSession.builder.appName("slurm-test").getOrCreate()
out = run_mpi(spark, lambda comm, rows: [(comm.rank, comm.allreduce(comm.rank + 1))], ranks=2)
print("RESULT", sorted(out.collect()), flush=True)
spark.stop()
"""


def test_sbatch_script_follows_the_seed_layout(tmp_path):
    app = tmp_path / "app.py"
    app.write_text(APP)
    text = sbatch_script(str(app), ["--n", "3"], nodes=4, cores_per_node=8, time_limit="10")
    assert "#SBATCH --nodes=4" in text and "#SBATCH --cpus-per-task=8" in text
    assert "#SBATCH --time=10" in text
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1' in text  # first node
    assert "srun --ntasks-per-node=1" in text and "cluster worker" in text
    assert 'export SPARKMPI_PMI_HOST="$MASTER_ADDR"' in text
    assert "trap cleanup EXIT" in text and 'spark-submit" --master "$URL"' in text
    assert text.rstrip().endswith(f"{app} --n 3")
    with pytest.raises(ValueError, match="time must look like"):
        sbatch_script(str(app), time_limit="soon")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_cluster_start_status_run_stop(tmp_path):
    state = tmp_path / "cluster"
    done = spark_mpi(
        "cluster", "start", "--workers", "2", "--cores", "1", "--state-dir", str(state)
    )
    assert done.returncode == 0, done.stderr[-2000:]
    url = (state / "url").read_text().strip()
    try:
        done = spark_mpi("cluster", "status", "--state-dir", str(state))
        assert f"{url}: 2 worker(s) alive" in done.stdout
        done = spark_mpi(
            "run", "--np", "2", "--master", url, str(ROOT / "examples" / "hello_mpi.py")
        )
        assert done.returncode == 0, done.stderr[-3000:]
        assert "[rank 1] rank 1 of 2: Allreduce gave 3" in done.stdout
    finally:
        done = spark_mpi("cluster", "stop", "--state-dir", str(state))
    assert done.returncode == 0 and "stopped" in done.stdout
    done = spark_mpi("cluster", "status", "--state-dir", str(state))
    assert ": 0 worker(s) alive" in done.stdout and "running" not in done.stdout


@pytest.fixture
def slurm(tmp_path):
    if shutil.which("sbatch") is None or os.geteuid() != 0:
        pytest.skip("needs root and the SLURM packages (scripts/setup.sh installs them)")
    state = tmp_path / "slurm"
    script = str(ROOT / "scripts" / "slurm-local.sh")
    started = subprocess.run(
        ["bash", script, "start", str(state)], capture_output=True, text=True, timeout=120
    )
    assert started.returncode == 0, started.stderr
    yield {**os.environ, "SLURM_CONF": str(state / "slurm.conf")}
    subprocess.run(["bash", script, "stop", str(state)], timeout=60, check=False)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_generated_sbatch_script_runs_a_two_rank_job(slurm, tmp_path):
    (tmp_path / "app.py").write_text(APP)
    command = ["spark-mpi", "slurm", "script", "app.py", "--nodes", "1", "--cores-per-node", "2"]
    command += ["--time", "5", "--master-address", "127.0.0.1", "-o", "job.sbatch"]
    done = subprocess.run(command, cwd=tmp_path, env=slurm, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    done = subprocess.run(
        ["spark-mpi", "slurm", "submit", "job.sbatch"],
        cwd=tmp_path,
        env=slurm,
        capture_output=True,
        text=True,
        timeout=360,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert "RESULT [(0, 3), (1, 3)]" in done.stdout
    assert "COMPLETED" in done.stdout
    assert list(tmp_path.glob("spark-mpi-*-worker-0.log"))
