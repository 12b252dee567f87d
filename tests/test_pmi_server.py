"""The PMI server with real MPICH ranks (no Spark): jobs, access control, robustness."""

from __future__ import annotations

import socket

import pytest

from helpers import finish, start_ranks
from sparkmpi.pmi import PMIAuthError, PMIServer, connect_rank, format_command, parse_command

ALLREDUCE = (
    "from mpi4py import MPI; import numpy as np; c = MPI.COMM_WORLD;"
    "a = np.full(1000, c.rank + 1.0); b = np.empty_like(a); c.Allreduce(a, b);"
    "print(c.rank, c.size, int(b[0]))"
)


@pytest.fixture
def server():
    with PMIServer() as srv:
        yield srv


@pytest.mark.parametrize("size", [1, 2, 3])
def test_mpich_ranks_join_and_allreduce(server, size):
    outs = finish(start_ranks(server, size, ALLREDUCE))
    total = size * (size + 1) // 2
    assert sorted(outs) == sorted(f"{r} {size} {total}\n" for r in range(size))


def test_ranks_on_one_host_share_memory_and_others_exchange_addresses(server):
    one_host = start_ranks(server, 2, ALLREDUCE, hosts=["a", "a"])
    (job_a,) = server._jobs.values()
    assert sorted(finish(one_host)) == ["0 2 3\n", "1 2 3\n"]
    assert job_a.mapping() == "(vector,(0,1,2))"
    assert job_a.kvs == {}  # shared memory: no network addresses needed
    two_hosts = start_ranks(server, 2, ALLREDUCE, hosts=["a", "b"])
    job_b = next(j for j in server._jobs.values() if j is not job_a)
    assert sorted(finish(two_hosts)) == ["0 2 3\n", "1 2 3\n"]
    assert job_b.mapping() == "(vector,(0,2,1))"
    assert job_b.kvs  # the network module's addresses went through put/barrier/get


def test_two_jobs_at_once_keep_their_own_spaces(server):
    a = start_ranks(server, 2, ALLREDUCE)
    b = start_ranks(server, 3, ALLREDUCE)
    assert sorted(finish(a)) == ["0 2 3\n", "1 2 3\n"]
    assert sorted(finish(b)) == ["0 3 6\n", "1 3 6\n", "2 3 6\n"]


def _raw(server: PMIServer, line: bytes) -> str:
    with socket.create_connection(server.address, timeout=10) as s:
        assert s.makefile("rb").readline().startswith(b"cmd=challenge ")
        s.sendall(line)
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        assert s.recv(10) == b"", "the server should close a refused connection"
    return data.decode()


def test_bad_clients_are_refused_while_a_job_runs(server):
    slow = ALLREDUCE.replace(
        "c = MPI.COMM_WORLD;", "c = MPI.COMM_WORLD; import time; time.sleep(1);"
    )
    running = start_ranks(server, 2, slow)
    job = server.create_job(1)
    refusals = {
        "malformed": _raw(server, b"this is not pmi\n"),
        "unauthenticated": _raw(server, b"cmd=initack pmiid=0\n"),
        "wrong response": _raw(
            server,
            format_command(
                "auth", job=job.job_id, rank=0, host="h", cnonce="00", digest="nope"
            ).encode(),
        ),
        "unknown job": _raw(
            server,
            format_command("auth", job="zzz", rank=0, host="h", cnonce="00", digest="x").encode(),
        ),
    }
    for what, reply in refusals.items():
        assert "rc=-1" in reply, what
    assert server.refused >= 4
    assert sorted(finish(running)) == ["0 2 3\n", "1 2 3\n"]


def test_unknown_and_malformed_commands_get_an_error_and_the_connection_stays(server):
    job = server.create_job(2)
    for rank, line in [(0, b"cmd=put key\n"), (1, b"cmd=frobnicate nprocs=2\n")]:
        sock = connect_rank(server.address, job.job_id, job.secret, rank, "h")
        replies = sock.makefile("rb")
        sock.sendall(line)
        assert b"rc=-1" in replies.readline()
        sock.sendall(b"cmd=get_maxes\n")
        assert replies.readline().startswith(b"cmd=maxes rc=0")
        sock.close()
    assert sorted(finish(start_ranks(server, 2, ALLREDUCE))) == ["0 2 3\n", "1 2 3\n"]


def test_unparseable_lines_close_only_that_connection(server):
    job = server.create_job(2)
    sock = connect_rank(server.address, job.job_id, job.secret, 0, "h")
    sock.sendall(b"not a pmi line\n")
    assert b"rc=-1" in sock.makefile("rb").readline()
    assert sock.recv(10) == b""
    sock.close()
    assert sorted(finish(start_ranks(server, 2, ALLREDUCE))) == ["0 2 3\n", "1 2 3\n"]


SPAWN = (
    "import sys; from mpi4py import MPI; c = MPI.COMM_WORLD\n"
    "if c.rank == 0:\n"
    "    try:\n"
    "        MPI.COMM_SELF.Spawn(sys.executable, ['-c', 'pass'], maxprocs=1)\n"
    "    except MPI.Exception as exc:\n"
    "        print('spawn refused', exc.Get_error_class() != MPI.SUCCESS)\n"
    "print(c.rank, c.allreduce(c.rank + 1))\n"
)


def test_mpi_comm_spawn_without_a_launcher_fails_with_an_mpi_error_not_a_crash(server):
    """A job created without ``on_spawn`` reads MPICH's ``mcmd=spawn`` block whole and
    refuses it; the rank goes on."""
    outs = finish(start_ranks(server, 2, SPAWN))
    assert outs[0].splitlines() == ["spawn refused True", "0 3"]
    assert outs[1].splitlines() == ["1 3"]


def test_connect_rank_reports_refusal(server):
    job = server.create_job(1)
    with pytest.raises(PMIAuthError, match="wrong response"):
        connect_rank(server.address, job.job_id, "bad", 0, "h")
    sock = connect_rank(server.address, job.job_id, job.secret, 0, "h")
    with pytest.raises(PMIAuthError, match="already joined"):
        connect_rank(server.address, job.job_id, job.secret, 0, "h")
    sock.close()


def test_names_are_shared_between_jobs(server):
    a, b = server.create_job(1), server.create_job(1)
    sa = connect_rank(server.address, a.job_id, a.secret, 0, "h").makefile("rwb", buffering=0)
    sb = connect_rank(server.address, b.job_id, b.secret, 0, "h").makefile("rwb", buffering=0)
    sa.write(b"cmd=publish_name service=ocean port=tcp://x:1\n")
    assert parse_command(sa.readline()).get("rc") == "0"
    sb.write(b"cmd=lookup_name service=ocean\n")
    assert parse_command(sb.readline()).get("port") == "tcp://x:1"
    sa.close()
    sb.close()


def test_a_rank_that_disconnects_before_finalize_is_reported():
    lost = []
    with PMIServer() as server:
        job = server.create_job(2, on_lost=lambda job_id, rank: lost.append(rank))
        finished = connect_rank(server.address, job.job_id, job.secret, 0, "h")
        finished.sendall(b"cmd=finalize\n")
        assert finished.makefile("rb").readline().startswith(b"cmd=finalize_ack")
        finished.close()
        connect_rank(server.address, job.job_id, job.secret, 1, "h").close()
        import time

        deadline = time.monotonic() + 5
        while not lost and time.monotonic() < deadline:
            time.sleep(0.01)
    assert lost == [1]


def test_abort_is_reported():
    seen = []
    with PMIServer() as server:
        job = server.create_job(1, on_abort=lambda job_id, req: seen.append(req))
        sock = connect_rank(server.address, job.job_id, job.secret, 0, "h")
        sock.sendall(b"cmd=abort exitcode=7 message=it went wrong\n")
        sock.close()
        import time

        deadline = time.monotonic() + 5
        while not seen and time.monotonic() < deadline:
            time.sleep(0.01)
    assert seen and seen[0].exitcode == 7 and seen[0].message == "it went wrong"
