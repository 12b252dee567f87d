"""Open MPI 5 ranks through Spark: each rank's PMIx host joins the driver's PMI-1 job."""

from __future__ import annotations

import sys

import pytest

from sparkmpi import MPIJobError, run_mpi
from sparkmpi.runner.runtime import RuntimeNotFound, get_runtime

try:
    get_runtime("openmpi")
except RuntimeNotFound as exc:
    pytest.skip(str(exc), allow_module_level=True)


def library_sum_and_output(comm, rows):
    from mpi4py import MPI

    print(f"hello from {comm.rank}", flush=True)
    yield comm.rank, MPI.Get_library_version().split(",")[0], comm.allreduce(comm.rank + 1)


def test_open_mpi_ranks_form_one_world(spark):
    lines = []
    sink = lambda rank, stream, text: lines.append((rank, text))  # noqa: E731
    out = run_mpi(spark, library_sum_and_output, ranks=2, runtime="openmpi", output=sink)
    assert out.collect() == [(0, "Open MPI v5.0.11", 3), (1, "Open MPI v5.0.11", 3)]
    assert sorted(lines) == [(0, "hello from 0\n"), (1, "hello from 1\n")]


def raise_on_rank_1(comm, rows):
    if comm.rank == 1:
        raise ValueError("bad frame 17")
    comm.Barrier()  # rank 0 waits here until it is killed
    yield None


def abort_on_rank_0(comm, rows):
    if comm.rank == 0:
        comm.Abort(3)
    comm.Barrier()
    yield None


@pytest.mark.parametrize(
    ("fn", "reason"),
    [
        (raise_on_rank_1, r"MPI rank 1 of 2 on .*ValueError: bad frame 17"),
        (abort_on_rank_0, r"MPI rank 0 of 2 on .*MPI_Abort with exit code 3"),
    ],
    ids=["raises", "aborts"],
)
def test_a_failing_open_mpi_rank_fails_the_job(spark, fn, reason):
    with pytest.raises(MPIJobError, match=reason):
        run_mpi(spark, fn, ranks=2, runtime="openmpi", output=None, timeout=120)


def spawn_then_allreduce(comm, rows):
    from mpi4py import MPI

    try:
        MPI.COMM_SELF.Spawn(sys.executable, ["-c", "pass"], maxprocs=1)
        refused = False
    except MPI.Exception:
        refused = True
    yield refused, comm.allreduce(1)


def test_spawn_with_open_mpi_is_an_mpi_error_and_the_job_goes_on(spark, capfd):
    out = run_mpi(spark, spawn_then_allreduce, ranks=2, runtime="openmpi", output=None)
    assert out.collect() == [(True, 2), (True, 2)]
