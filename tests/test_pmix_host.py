"""Open MPI 5 ranks joined through sparkmpi.pmix hosts to a real PMIServer (2 ranks)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sparkmpi.pmi import AbortRequest, PMIServer, connect_rank
from sparkmpi.pmix import start_host

PREFIX = Path(os.environ.get("SPARKMPI_OMPI_PREFIX", "/opt/sparkmpi-ompi"))
LIBMPI = PREFIX / "lib" / "libmpi.so.40"

pytestmark = [
    pytest.mark.skipif(
        not LIBMPI.exists(),
        reason=f"Open MPI 5 is not installed at {PREFIX} (scripts/setup.sh installs it)",
    ),
    pytest.mark.skipif(
        subprocess.run([sys.executable, "-c", "import mpi4py"], capture_output=True).returncode,
        reason="mpi4py is not installed",
    ),
]

ALLREDUCE = """
from mpi4py import MPI
c = MPI.COMM_WORLD
shared = c.Split_type(MPI.COMM_TYPE_SHARED).Get_size()
version = MPI.Get_library_version().splitlines()[0]
total = c.allreduce(c.rank + 1)
print(f"rank={c.rank} size={c.size} sum={total} shared={shared} "
      f"name={MPI.Get_processor_name()} lib={version}", flush=True)
"""

ABORT = """
from mpi4py import MPI
c = MPI.COMM_WORLD
c.Barrier()
if c.rank == 1:
    c.Abort(3)
c.Barrier()
"""


def run_job(hosts: list[str], code: str, timeout: float = 60):
    """Runs ``code`` as len(hosts) Open MPI ranks; returns their (exit code, stdout), the
    hosts' exit codes and the server's abort requests. Everything started is killed by PID."""
    aborts: list[AbortRequest] = []
    started: list[subprocess.Popen] = []
    hosts_started: list = []
    server = PMIServer().start()
    try:
        job = server.create_job(len(hosts), on_abort=lambda _job, req: aborts.append(req))
        socks = [
            connect_rank(server.address, job.job_id, job.secret, rank, host)
            for rank, host in enumerate(hosts)
        ]
        envs = []
        for rank, sock in enumerate(socks):
            host, env = start_host(sock.fileno(), rank, len(hosts), PREFIX, dict(os.environ))
            hosts_started.append(host)
            started.append(host.proc)
            assert "PMI_FD" not in env
            envs.append(env)
            sock.close()
        ranks = []
        for env in envs:
            rank = subprocess.Popen(
                [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True
            )
            started.append(rank)
            ranks.append(rank)
        results = [(r.wait(timeout=timeout), r.stdout.read()) for r in ranks]  # type: ignore[union-attr]
        host_codes = []
        for host in hosts_started:
            host.proc.stdin.close()  # type: ignore[union-attr]
            host_codes.append(host.proc.wait(timeout=15))
            host.close()
            assert not host.tmpdir.exists()
        return results, host_codes, aborts
    finally:
        for proc in started:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        server.stop()


def _fields(line: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in line.split(" lib=")[0].split())


@pytest.mark.parametrize(
    ("hosts", "shared"), [(["nodeA", "nodeA"], 2), (["nodeA", "nodeB"], 1)], ids=["1node", "2node"]
)
def test_allreduce(hosts: list[str], shared: int) -> None:
    results, host_codes, aborts = run_job(hosts, ALLREDUCE)
    for rank, (code, out) in enumerate(results):
        assert code == 0, out
        fields = _fields(out.strip())
        assert fields["rank"] == str(rank)
        assert fields["size"] == "2"
        assert fields["sum"] == "3"
        assert fields["shared"] == str(shared)
        assert fields["name"]
        assert "Open MPI v5.0.11" in out
    assert host_codes == [0, 0]
    assert aborts == []


def test_abort_reaches_the_server() -> None:
    results, host_codes, aborts = run_job(["nodeA", "nodeA"], ABORT, timeout=60)
    assert aborts, "on_abort did not fire"
    assert aborts[0].rank == 1
    assert aborts[0].exitcode == 3
    assert results[1][0] == 3
    assert all(code == 0 for code in host_codes)
