"""A Spark standalone cluster from the ``spark-class`` launcher in the pyspark wheel.

The master and the workers started here are recorded (PID, log, command) in a state
directory, so another command can report on them or stop them, by PID only. A worker can also
be started in the foreground on any host (``spark-mpi cluster worker``), which is how SLURM's
``srun`` places one worker per node.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pyspark

from sparkmpi.deploy.ports import free_port

SPARK_HOME = Path(pyspark.__file__).parent
DEFAULT_STATE = Path.home() / ".sparkmpi" / "cluster"
MASTER_CLASS = "org.apache.spark.deploy.master.Master"
WORKER_CLASS = "org.apache.spark.deploy.worker.Worker"


def spark_env(host: str | None = None) -> dict[str, str]:
    """Environment for Spark's launchers and drivers: this Python for the workers, the wheel's
    Spark, and (when given) the address to bind."""
    env = {
        **os.environ,
        "SPARK_HOME": str(SPARK_HOME),
        "PYSPARK_PYTHON": sys.executable,
        "SPARK_NO_DAEMONIZE": "1",
    }
    if host:
        env["SPARK_LOCAL_IP"] = host
    return env


def worker_command(master: str, cores: int, memory: str, host: str | None, work_dir: str):
    """The ``spark-class`` command line of a worker joining ``master``."""
    command = [str(SPARK_HOME / "bin" / "spark-class"), WORKER_CLASS, "--cores", str(cores)]
    command += ["--memory", memory, "--work-dir", work_dir, "--webui-port", "0"]
    if host:
        command += ["--host", host]
    return [*command, master]


def _alive(pid: int) -> bool:
    """True if ``pid`` is still one of the Spark daemons we started (not a reused PID)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    if state in ("Z", "X"):
        return False
    # empty while spark-class execs java: still ours, not dead (seen as a false "master died")
    return not cmdline or b"org.apache.spark.deploy" in cmdline or b"spark-class" in cmdline


class StandaloneCluster:
    """A master on ``host`` and ``workers`` local workers of ``cores`` cores each."""

    def __init__(
        self,
        state_dir: str | os.PathLike = DEFAULT_STATE,
        *,
        workers: int = 2,
        cores: int = 1,
        memory: str = "1g",
        host: str = "127.0.0.1",
        port: int | None = None,
    ):
        self.state_dir = Path(state_dir)
        self.workers, self.cores, self.memory, self.host = workers, cores, memory, host
        self.port = port or free_port(host)
        self.webui_port = free_port(host)
        self.url = f"spark://{host}:{self.port}"
        self.pids: dict[str, int] = {}
        self.env = spark_env(host)

    @classmethod
    def load(cls, state_dir: str | os.PathLike = DEFAULT_STATE) -> StandaloneCluster:
        """The cluster recorded in ``state_dir``; FileNotFoundError if none is."""
        state = json.loads((Path(state_dir) / "state.json").read_text())
        cluster = cls(
            state_dir,
            workers=state["workers"],
            cores=state["cores"],
            host=state["host"],
            port=state["port"],
        )
        cluster.webui_port, cluster.pids = state["webui_port"], state["pids"]
        return cluster

    def _save(self) -> None:
        state = {
            "url": self.url,
            "host": self.host,
            "port": self.port,
            "workers": self.workers,
            "cores": self.cores,
            "webui_port": self.webui_port,
            "pids": self.pids,
        }
        (self.state_dir / "state.json").write_text(json.dumps(state, indent=2))
        (self.state_dir / "url").write_text(self.url + "\n")

    def _spawn(self, name: str, command: list[str]) -> None:
        with open(self.state_dir / f"{name}.log", "wb") as log:
            proc = subprocess.Popen(
                command,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.pids[name] = proc.pid
        self._save()

    def start(self, timeout: float = 120) -> StandaloneCluster:
        """Starts the master and the workers; returns once every worker has registered."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        if (self.state_dir / "state.json").exists() and any(
            _alive(p) for p in StandaloneCluster.load(self.state_dir).pids.values()
        ):
            raise RuntimeError(f"{self.state_dir}: a cluster is already running there")
        self.pids = {}
        master = [str(SPARK_HOME / "bin" / "spark-class"), MASTER_CLASS, "--host", self.host]
        master += ["--port", str(self.port), "--webui-port", str(self.webui_port)]
        self._spawn("master", master)
        for i in range(self.workers):
            work_dir = str(self.state_dir / f"work{i}")
            self._spawn(
                f"worker{i}", worker_command(self.url, self.cores, self.memory, self.host, work_dir)
            )
        try:
            self.wait_for_workers(self.workers, timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def alive_workers(self) -> int:
        """Workers the master counts as alive (0 if it does not answer)."""
        try:
            url = f"http://{self.host}:{self.webui_port}/json/"
            with urllib.request.urlopen(url, timeout=2) as reply:
                return int(json.load(reply).get("aliveworkers", 0))
        except (OSError, ValueError):
            return 0

    def wait_for_workers(self, count: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while self.alive_workers() < count:
            if not _alive(self.pids.get("master", -1)):
                raise RuntimeError(f"the Spark master died; see {self.state_dir / 'master.log'}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{count} workers did not register within {timeout} s")
            time.sleep(0.3)

    def status(self) -> dict:
        """URL, workers alive at the master, and which recorded processes still run."""
        return {
            "url": self.url,
            "alive_workers": self.alive_workers(),
            "processes": {name: (pid, _alive(pid)) for name, pid in self.pids.items()},
        }

    def stop(self, timeout: float = 20) -> None:
        """Stops the recorded processes (by PID: SIGTERM, then SIGKILL) and forgets them."""
        running = {n: p for n, p in self.pids.items() if _alive(p)}
        for pid in running.values():
            os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while any(_alive(p) for p in running.values()) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in running.values():
            if _alive(pid):
                os.killpg(pid, signal.SIGKILL)
        for pid in running.values():
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        self.pids = {}
        if (self.state_dir / "state.json").exists():
            self._save()

    def __enter__(self) -> StandaloneCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
