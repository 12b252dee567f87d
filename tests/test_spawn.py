"""MPI_Comm_spawn inside run_mpi: real MPICH ranks spawn real children beside themselves."""

from __future__ import annotations

import sys

import psutil
import pytest

from sparkmpi import MPIJobError, run_mpi

CHILD = (
    "from mpi4py import MPI\n"
    "parent = MPI.Comm.Get_parent()\n"
    "world = MPI.COMM_WORLD\n"
    "merged = parent.Merge(high=True)\n"
    "merged.gather((world.rank, world.size, world.Get_attr(MPI.APPNUM), merged.rank), root=0)\n"
    "print('child', world.rank, 'says hello', flush=True)\n"
    "merged.Free()\n"
    "parent.Disconnect()\n"
)


def spawn_two_commands(comm, rows):
    """Each rank spawns one child of each of two commands and merges with them."""
    from mpi4py import MPI

    child = MPI.COMM_SELF.Spawn_multiple(
        [sys.executable, sys.executable], [["-c", CHILD], ["-c", CHILD]], [1, 1]
    )
    remote = child.Get_remote_size()
    merged = child.Merge(high=False)
    seen = merged.gather(None, root=0)
    merged.Free()
    child.Disconnect()
    yield comm.rank, remote, sorted(seen[1:])


@pytest.mark.parametrize("runtime", ["mpich", "impi"])
def test_spawned_children_join_their_parent_rank(spark, runtime):
    lines: list[tuple[int, str]] = []
    sink = lambda r, s, t: lines.append((r, t))  # noqa: E731
    out = run_mpi(spark, spawn_two_commands, ranks=2, runtime=runtime, output=sink).collect()
    # child rank, child world size, MPI_APPNUM (its command), rank in the merged communicator
    assert out == [(r, 2, [(0, 2, 0, 1), (1, 2, 1, 2)]) for r in range(2)]
    text = "".join(t for _, t in lines)
    for rank in range(2):
        assert any(r == rank and "[spawned 0] child 0 says hello" in t for r, t in lines), text


@pytest.fixture(params=["beside", "executors"])
def placement(request, monkeypatch):
    """Where spawned processes start: beside their parent rank, or as a Spark stage."""
    monkeypatch.setenv("SPARKMPI_SPAWN_PLACEMENT", request.param)
    return request.param


CHILD_PPID = (
    "import os\nfrom mpi4py import MPI\np = MPI.Comm.Get_parent()\n"
    "p.send(os.getppid(), dest=0)\np.Disconnect()\n"
)


def spawn_and_find_its_task(comm, rows):
    import os

    from mpi4py import MPI

    child = MPI.COMM_SELF.Spawn(sys.executable, ["-c", CHILD_PPID], maxprocs=1)
    started_by = child.recv(source=0)
    child.Disconnect()
    yield started_by == int(os.environ["SPARKMPI_PARENT_PID"])


def test_spawned_processes_start_where_the_placement_says(spark, placement):
    """Beside: the parent rank's own task starts the child; executors: another task does."""
    out = run_mpi(spark, spawn_and_find_its_task, ranks=2, output=None).collect()
    assert out == [placement == "beside"] * 2


def spawn_missing_program(comm, rows):
    from mpi4py import MPI

    try:
        MPI.COMM_SELF.Spawn("/nonexistent/program", [], maxprocs=1)
    except MPI.Exception as exc:
        yield comm.rank, exc.Get_error_class() != MPI.SUCCESS
    yield comm.allreduce(1)


def test_a_program_that_cannot_start_is_an_mpi_error_and_the_job_goes_on(spark, placement):
    assert run_mpi(spark, spawn_missing_program, ranks=2, output=None).collect() == [
        (0, True),
        2,
        (1, True),
        2,
    ]


def spawn_and_wait(code: str):
    def fn(comm, rows):
        from mpi4py import MPI

        child = MPI.COMM_SELF.Spawn(sys.executable, ["-c", code], maxprocs=1)
        if comm.rank == 0:
            child.recv(source=0)  # never sent: only the failure can end this
        comm.Barrier()
        yield None

    return fn


def no_child_left() -> bool:
    """No live process of this test runs a spawned child's code."""
    for proc in psutil.Process().children(recursive=True):
        try:
            command = " ".join(proc.cmdline())
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
        if "os._exit(3)" in command or "Abort(7)" in command:
            return False
    return True


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        (
            "import os\nfrom mpi4py import MPI\nMPI.Comm.Get_parent()\nos._exit(3)",
            r"rank [01] .*process 0 it spawned \(.*\) exited with status 3",
        ),
        (
            "from mpi4py import MPI\nMPI.Comm.Get_parent()\nMPI.COMM_WORLD.Abort(7)",
            r"rank [01] .*process 0 it spawned (called MPI_Abort with exit code 7"
            r"|\(.*\) exited with status 7)",
        ),
    ],
    ids=["exits", "aborts"],
)
def test_a_failing_child_fails_the_whole_job(spark, code, reason, placement):
    with pytest.raises(MPIJobError, match=reason):
        run_mpi(spark, spawn_and_wait(code), ranks=2, output=None, timeout=120)
    assert no_child_left()
