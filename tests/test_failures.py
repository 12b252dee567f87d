"""A dying rank never leaves a job hanging: fail fast, kill the rest, surface the traceback."""

from __future__ import annotations

import time

import psutil
import pytest

from helpers import rank_processes
from sparkmpi import MPIJobError, run_mpi


def test_a_raising_rank_is_named_with_its_traceback(spark):
    def boom(comm, rows):
        if comm.rank == 1:
            raise ValueError("bad frame 17")
        comm.Barrier()  # rank 0 waits for rank 1 forever unless someone kills it
        yield comm.rank

    start = time.monotonic()
    with pytest.raises(MPIJobError) as info:
        run_mpi(spark, boom, ranks=2, output=None)
    assert time.monotonic() - start < 10
    error = info.value
    assert error.rank == 1
    first_line = str(error).splitlines()[0]
    assert first_line.startswith("MPI rank 1 of 2") and "ValueError: bad frame 17" in first_line
    assert "Traceback from rank 1:" in str(error) and "in boom" in str(error)


def test_a_rank_killed_in_the_middle_of_allreduce(spark):
    def killed(comm, rows):
        import os
        import signal

        import numpy as np

        a, b = np.ones(10_000), np.empty(10_000)
        for i in range(10**9):
            comm.Allreduce(a, b)
            if comm.rank == 1 and i == 500:
                os.kill(os.getpid(), signal.SIGKILL)
        yield 0

    start = time.monotonic()
    with pytest.raises(MPIJobError, match=r"MPI rank 1 of 2 on .* killed by signal SIGKILL"):
        run_mpi(spark, killed, ranks=2, output=None)
    assert time.monotonic() - start < 10
    assert rank_processes() == []


def test_a_rank_that_exits_early(spark):
    def quitter(comm, rows):
        import os
        import sys

        if comm.rank == 0:
            print("giving up", file=sys.stderr, flush=True)
            os._exit(3)
        comm.Barrier()
        return []

    with pytest.raises(MPIJobError) as info:
        run_mpi(spark, quitter, ranks=2, output=None)
    assert info.value.rank == 0
    assert "exited with status 3" in str(info.value) and "giving up" in str(info.value)


def test_mpi_abort_fails_the_job(spark):
    def aborter(comm, rows):
        if comm.rank == 1:
            comm.Abort(5)
        comm.Barrier()
        return []

    with pytest.raises(MPIJobError) as info:
        run_mpi(spark, aborter, ranks=2, output=None)
    assert info.value.rank == 1
    assert "MPI_Abort with exit code 5" in str(info.value) or "status 5" in str(info.value)


def test_timeout_stops_a_hung_job(spark):
    def hang(comm, rows):
        if comm.rank == 0:
            comm.recv(source=1)  # never sent
        return []

    start = time.monotonic()
    with pytest.raises(MPIJobError, match="timed out after 2"):
        run_mpi(spark, hang, ranks=2, timeout=2, output=None)
    assert time.monotonic() - start < 12


def test_a_function_that_returns_a_non_iterable(spark):
    with pytest.raises(MPIJobError, match="must yield its results or return an iterable"):
        run_mpi(spark, lambda comm, rows: 42, ranks=1, output=None)


def test_spark_keeps_working_after_failures(spark):
    with pytest.raises(MPIJobError):
        run_mpi(spark, lambda comm, rows: 1 / 0, ranks=2, output=None)
    assert run_mpi(spark, lambda comm, rows: [comm.size], ranks=2, output=None).collect() == [2, 2]


def _start_helper(pidfile) -> None:
    """Starts a long-lived child in a session of its own that keeps the rank's pipes open."""
    import subprocess
    import sys

    child = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True
    )
    pidfile.write_text(str(child.pid))


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_a_failing_rank_with_a_child_in_its_own_session_fails_fast(spark, tmp_path):
    helpers = [tmp_path / "helper0.pid", tmp_path / "helper1.pid"]

    def fn(comm, rows):
        _start_helper(helpers[comm.rank])
        comm.Barrier()
        if comm.rank == 1:
            raise RuntimeError("failed after starting a helper")
        comm.Barrier()
        yield 0

    start = time.monotonic()
    with pytest.raises(MPIJobError, match="failed after starting a helper") as info:
        run_mpi(spark, fn, ranks=2, output=None)
    assert time.monotonic() - start < 10
    assert info.value.rank == 1
    # the failing rank's helper and the killed rank's helper both died with the job
    assert all(_gone(int(path.read_text())) for path in helpers)
    assert rank_processes() == []


def test_a_finished_rank_leaves_no_child_behind(spark, tmp_path):
    pidfile = tmp_path / "helper.pid"

    def fn(comm, rows):
        if comm.rank == 0:
            _start_helper(pidfile)
        yield comm.rank

    assert sorted(run_mpi(spark, fn, ranks=2, output=None).collect()) == [0, 1]
    assert _gone(int(pidfile.read_text()))
