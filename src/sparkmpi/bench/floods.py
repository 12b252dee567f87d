"""Connection floods against this driver's PMI and control listeners, with a job running.

The flood comes from a child process (its sockets must not count against the driver's file
descriptors): idle connections that never authenticate, slow-loris connections dripping a byte
at a time, and connections sending 16 MB without a newline. The driver's descriptors and
resident memory are sampled before, during and after, and an MPI job runs during the idle
flood, under a 1024-descriptor limit like a default Linux login's.
"""

from __future__ import annotations

import contextlib
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

FLOODER = r"""
import socket, sys, time
mode, host, ports, count = sys.argv[1], sys.argv[2], sys.argv[3].split(","), int(sys.argv[4])
socks = []
for i in range(count):
    try:
        socks.append(socket.create_connection((host, int(ports[i % len(ports)])), timeout=30))
    except OSError:
        pass
if mode == "oversized":
    blob = b"x" * (16 << 20)
    for s in socks:
        try:
            s.sendall(blob)
        except OSError:
            pass
elif mode == "slow":
    for _ in range(200):
        for s in list(socks):
            try:
                s.send(b"c")
            except OSError:
                socks.remove(s)
        if not socks:
            break
        time.sleep(0.05)
print("held", len(socks), flush=True)
sys.stdin.readline()
"""


def descriptors() -> int:
    return len(list(Path("/proc/self/fd").iterdir()))


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


class Sampler:
    """The highest descriptor count and RSS of this process while it runs."""

    def __init__(self) -> None:
        self.fds, self.rss = descriptors(), rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.fds, self.rss = max(self.fds, descriptors()), max(self.rss, rss_mb())

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@contextlib.contextmanager
def flood(mode: str, host: str, ports: list[int], count: int):
    """A child process holding ``count`` connections of ``mode`` until the block ends."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    child = subprocess.Popen(
        [sys.executable, "-c", FLOODER, mode, host, ",".join(map(str, ports)), str(count)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard)),
    )
    try:
        line = child.stdout.readline() if child.stdout else ""
        yield int(line.split()[1]) if line.startswith("held") else 0
    finally:
        with contextlib.suppress(OSError):
            child.stdin.close() if child.stdin else None
        try:
            child.wait(timeout=60)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def _settled(hub, timeout: float = 60) -> None:
    """Waits until neither listener holds a connection that has not authenticated."""
    deadline = time.monotonic() + timeout
    while hub.pmi.listener.unauthenticated or hub.listener.unauthenticated:
        if time.monotonic() > deadline:
            return
        time.sleep(0.05)


def _small_job(spark) -> str:
    from sparkmpi import MPIJobError, run_mpi

    try:
        run_mpi(spark, lambda comm, rows: [comm.allreduce(1)], ranks=2, output=None).collect()
        return "ok"
    except MPIJobError as exc:
        return str(exc).splitlines()[0]


def measure_floods(connections: int = 1100) -> dict:
    """Descriptors and memory of this driver around each flood; whether a job ran during one."""
    from sparkmpi.runner.barrier import hub_for
    from sparkmpi.runner.context import spark_session

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))
    spark = spark_session(cores=2, app_name="bench faults (floods)")
    try:
        hub = hub_for(spark.sparkContext)
        ports = [hub.pmi.address[1], hub.address[1]]
        _small_job(spark)  # warm: Python workers and spare interpreters exist before measuring
        before = {"fds": descriptors(), "rss": rss_mb()}
        with Sampler() as idle, flood("idle", hub.advertise, ports, connections) as held:
            job = _small_job(spark)
        _settled(hub)
        after_idle = {"fds": descriptors(), "rss": rss_mb()}
        with Sampler() as slow, flood("slow", hub.advertise, ports, 50):
            pass
        _settled(hub)
        with Sampler() as big, flood("oversized", hub.advertise, ports, 8):
            pass
        _settled(hub)
        after = {"fds": descriptors(), "rss": rss_mb()}
        limits = hub.limits
        refused = dict(hub.pmi.listener.refusals.reasons + hub.listener.refusals.reasons)
    finally:
        spark.stop()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return {
        "fd_limit": min(1024, hard),
        "limits": {
            "auth_deadline_s": limits.auth_deadline,
            "max_line": limits.max_line,
            "max_unauthenticated": limits.max_unauthenticated,
        },
        "idle_connections": connections,
        "idle_connections_opened": held,
        "job_during_flood": job,
        "fds": {
            "before": before["fds"],
            "during_idle_flood_max": idle.fds,
            "after_idle_flood": after_idle["fds"],
            "during_slow_loris_max": slow.fds,
            "after": after["fds"],
        },
        "rss_mb": {
            "before": before["rss"],
            "during_idle_flood_max": idle.rss,
            "during_oversized_max": big.rss,
            "after": after["rss"],
        },
        "refused": refused,
    }
