"""Test helpers: start real MPI rank processes against a PMIServer without Spark."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import psutil

from sparkmpi.pmi import PMIServer, connect_rank
from sparkmpi.runner.runtime import get_runtime

RANK_NAME = "sparkmpi-rank"  # set by the rank process itself (spares are "sparkmpi-spare")


def start_ranks(
    server: PMIServer,
    size: int,
    program: str,
    runtime: str = "mpich",
    hosts: list[str] | None = None,
) -> list[subprocess.Popen]:
    """``size`` Python processes running ``program``, admitted as one job of ``server``
    (rank ``r`` claiming to run on ``hosts[r]``, default this host)."""
    job = server.create_job(size)
    procs = []
    for rank in range(size):
        host = hosts[rank] if hosts else socket.gethostname()
        sock = connect_rank(server.address, job.job_id, job.secret, rank, host)
        env = {**os.environ, **get_runtime(runtime).rank_env()}
        env.update(PMI_FD=str(sock.fileno()), PMI_RANK=str(rank), PMI_SIZE=str(size))
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", program],
                env=env,
                pass_fds=[sock.fileno()],
                stdout=subprocess.PIPE,
                text=True,
            )
        )
        sock.close()
    return procs


def finish(procs: list[subprocess.Popen], timeout: float = 60) -> list[str]:
    """Each process's stdout; kills them all if any does not end in ``timeout``."""
    try:
        outs = [p.communicate(timeout=timeout)[0] for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
            p.wait()
        raise
    assert [p.returncode for p in procs] == [0] * len(procs), outs
    return outs


def rank_processes() -> list[psutil.Process]:
    """Rank processes (not idle spares) started, directly or through Spark, by this test."""
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.name() == RANK_NAME and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            pass
    return found


def run_command(command: list[str], timeout: float, env=None) -> subprocess.CompletedProcess:
    """``command`` run in a process group of its own (no stdin), its output captured; past
    ``timeout`` the whole group is killed (not only the command: a Spark driver's JVM and what
    it started go too) and TimeoutExpired is raised."""
    process = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    return subprocess.CompletedProcess(command, process.returncode, out, err)


def spark_mpi(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """The ``spark-mpi`` command run with ``args`` (see :func:`run_command`)."""
    return run_command([sys.executable, "-m", "sparkmpi.cli", *args], timeout)


def run_bench(tmp_path, name: str, *args: str, timeout: float = 300, env=None):
    """``spark-mpi bench NAME ARGS --json --plot`` in ``tmp_path``: checks it succeeded and
    drew a plot; returns the finished process and the JSON it wrote."""
    out_json, out_png = tmp_path / f"{name}.json", tmp_path / f"{name}.png"
    outputs = ["--json", str(out_json), "--plot", str(out_png)]
    command = [sys.executable, "-m", "sparkmpi.cli", "bench", name, *args, *outputs]
    done = run_command(command, timeout, env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert out_png.stat().st_size > 1000
    return done, json.loads(out_json.read_text())


def compile_cuda(source: str, tmp_path, arch: str = "compute_90") -> str:
    """PTX of CUDA C ``source`` compiled by nvcc (no GPU needed); skips the test when nvcc is
    missing, fails it with nvcc's message when the source does not compile."""
    import shutil

    import pytest

    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not installed: CUDA kernels are only compiled where it is")
    path, ptx = tmp_path / "kernels.cu", tmp_path / "kernels.ptx"
    path.write_text(source)
    done = subprocess.run(
        [nvcc, "-ptx", f"-arch={arch}", "-o", str(ptx), str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return ptx.read_text()


def ptx_entries(ptx: str) -> set[str]:
    """The kernel names a PTX file defines."""
    return {
        line.split()[2].split("(")[0]
        for line in ptx.splitlines()
        if line.startswith(".visible .entry")
    }


def gpu_worker_cluster(workdir, workers: int, cores: int, gpus: list[str]):
    """A standalone cluster (not started) whose workers each advertise ``gpus`` through a
    discovery script: Spark schedules the addresses without checking they are real GPUs."""
    from sparkmpi.deploy.standalone import StandaloneCluster

    discovery = workdir / "gpus.sh"
    addresses = ", ".join(f'"{g}"' for g in gpus)
    discovery.write_text(f'#!/bin/sh\necho \'{{"name": "gpu", "addresses": [{addresses}]}}\'\n')
    discovery.chmod(0o755)
    cluster = StandaloneCluster(workdir, workers=workers, cores=cores)
    cluster.env["SPARK_WORKER_OPTS"] = (
        f"-Dspark.worker.resource.gpu.amount={len(gpus)} "
        f"-Dspark.worker.resource.gpu.discoveryScript={discovery}"
    )
    return cluster


class Log(list):
    """A ``log=`` callable for drivers and sources that keeps the lines it is given."""

    def __call__(self, line: str) -> None:
        self.append(line)
