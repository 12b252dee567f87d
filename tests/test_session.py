"""MPISession: ranks that persist across submissions."""

from __future__ import annotations

import time

import numpy as np
import pytest

from helpers import rank_processes
from sparkmpi import InsufficientSlotsError, MPIJobError, MPISession, run_mpi


def test_fifty_submissions_then_clean_shutdown(spark):
    with MPISession(spark, 2, output=None) as session:
        pids = set()
        for i in range(50):
            results = session.run(
                lambda comm, d: (comm.allreduce(d), __import__("os").getpid()), data=[i, 100]
            )
            assert [r[0] for r in results] == [i + 100, i + 100]
            pids.update(r[1] for r in results)
        assert len(pids) == 2  # the same two processes served every submission
        assert len(rank_processes()) == 2
    deadline = time.monotonic() + 10
    while rank_processes() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert rank_processes() == []


def test_arrays_in_and_out(spark):
    with MPISession(spark, 2, output=None) as session:
        data = [np.full(100_000, 1.0), np.full(100_000, 2.0)]

        def total(comm, part):
            out = np.empty_like(part)
            comm.Allreduce(part, out)
            return out

        for result in session.run(total, data):
            np.testing.assert_array_equal(result, np.full(100_000, 3.0))


def test_failing_submission_ends_the_session(spark):
    session = MPISession(spark, 2, output=None)
    session.run(lambda comm, d: comm.rank)

    def bad(comm, d):
        if comm.rank == 0:
            raise KeyError("missing")
        comm.Barrier()

    start = time.monotonic()
    with pytest.raises(MPIJobError, match=r"MPI rank 0 of 2 .*KeyError"):
        session.run(bad)
    assert time.monotonic() - start < 10
    with pytest.raises(MPIJobError, match="closed"):
        session.run(lambda comm, d: 1)
    session.close()


def test_open_session_holds_its_slots(spark):
    with MPISession(spark, 2, output=None):
        with pytest.raises(InsufficientSlotsError, match="held by open MPI sessions"):
            run_mpi(spark, lambda comm, rows: [], ranks=3)
        assert run_mpi(spark, lambda comm, rows: [1], ranks=2, output=None).count() == 2
