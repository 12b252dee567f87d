"""run_mpi on a real local Spark with real MPICH ranks."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from sparkmpi import InsufficientSlotsError, run_mpi


def allreduce_rows(comm, rows):
    local = np.sum([r for r in rows], axis=0)
    total = np.empty_like(local)
    comm.Allreduce(local, total)
    yield comm.rank, total


@pytest.mark.parametrize("ranks", [1, 2, 4])
def test_allreduce_over_partitions(spark, ranks):
    rows = [np.full(5, float(i)) for i in range(12)]
    rdd = spark.sparkContext.parallelize(rows, ranks)
    out = run_mpi(rdd, allreduce_rows, output=None).collect()
    assert [rank for rank, _ in out] == list(range(ranks))
    for _, total in out:
        np.testing.assert_array_equal(total, np.full(5, float(sum(range(12)))))


def test_rank_is_partition_index_and_rows_stay_in_their_partition(spark):
    def who(comm, rows):
        rows = list(rows)
        everyone = comm.gather(rows, root=0)
        yield comm.rank, comm.size, rows, everyone

    from pyspark import TaskContext

    rdd = spark.sparkContext.parallelize(range(10), 3)
    expected = rdd.mapPartitions(lambda it: [(TaskContext.get().partitionId(), list(it))]).collect()
    out = run_mpi(rdd, who, output=None).collect()
    assert [(r, rows) for r, _, rows, _ in out] == expected
    assert all(size == 3 for _, size, _, _ in out)
    assert out[0][3] == [rows for _, rows in expected]


def test_no_input_ranks(spark):
    out = run_mpi(spark, lambda comm, rows: [(comm.rank, list(rows))], ranks=4, output=None)
    assert out.collect() == [(r, []) for r in range(4)]


def test_large_arrays_travel_out_of_band(spark):
    big = np.arange(4_000_000, dtype=np.float64)  # 32 MB per row

    def scale(comm, rows):
        for row in rows:
            yield row * (comm.rank + 1)

    out = run_mpi(spark.sparkContext.parallelize([big, big], 2), scale, output=None).collect()
    np.testing.assert_array_equal(out[0], big)
    np.testing.assert_array_equal(out[1], 2 * big)


def test_two_jobs_in_a_row_and_results_are_cached(spark):
    calls = []
    for _ in range(2):
        out = run_mpi(spark, lambda comm, rows: [comm.allreduce(1)], ranks=2, output=None)
        calls.append(out.collect())
        assert out.collect() == calls[-1]  # served from the cache, not run again
        out.unpersist()
    assert calls == [[2, 2], [2, 2]]


def test_two_jobs_at_the_same_time_from_two_threads(spark):
    results: dict[int, list] = {}

    def job(tag: int) -> None:
        def fn(comm, rows):
            time.sleep(0.5)
            yield tag, comm.allreduce(tag)

        results[tag] = run_mpi(spark, fn, ranks=2, output=None).collect()

    threads = [threading.Thread(target=job, args=(t,)) for t in (1, 10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results == {1: [(1, 2), (1, 2)], 10: [(10, 20), (10, 20)]}


def test_output_reaches_the_driver_prefixed(spark, captured, capfd):
    def chatty(comm, rows):
        import sys

        print(f"hello from {comm.rank}")
        print(f"warning from {comm.rank}", file=sys.stderr)
        return []

    run_mpi(spark, chatty, ranks=2, output=captured)
    assert sorted(captured.lines) == [
        (0, "stderr", "warning from 0"),
        (0, "stdout", "hello from 0"),
        (1, "stderr", "warning from 1"),
        (1, "stdout", "hello from 1"),
    ]
    run_mpi(spark, chatty, ranks=2)
    out, err = capfd.readouterr()
    assert "[rank 0] hello from 0" in out and "[rank 1] warning from 1" in err


def test_fewer_slots_than_ranks_fails_at_once(spark):
    start = time.monotonic()
    with pytest.raises(InsufficientSlotsError, match="5 MPI ranks need 5 free Spark task slots"):
        run_mpi(spark, lambda comm, rows: [], ranks=5)
    assert time.monotonic() - start < 5


def test_dataframe_input_and_repartition_to_ranks(spark):
    df = spark.range(0, 100)

    def count(comm, rows):
        yield comm.allreduce(sum(1 for _ in rows))

    assert run_mpi(df, count, ranks=3, output=None).collect() == [100, 100, 100]


def test_environment_reaches_ranks(spark):
    def env(comm, rows):
        import os

        yield os.environ.get("MY_SETTING"), os.environ.get("PMI_PORT")

    out = run_mpi(spark, env, ranks=1, env={"MY_SETTING": "42"}, output=None).collect()
    assert out == [("42", None)]


def _interpreters(comm, rows):
    import sys

    with open("/proc/self/cmdline", "rb") as f:
        yield b"--spare" in f.read(), sys.path


def test_later_jobs_use_prestarted_interpreters(spark):
    run_mpi(spark, _interpreters, ranks=4, output=None).collect()  # every worker gets a spare
    time.sleep(1.5)  # spares start shortly after a job ends
    warm = run_mpi(spark, _interpreters, ranks=2, output=None).collect()
    assert any(spare for spare, _ in warm)


def test_startup_variables_get_a_fresh_interpreter(spark):
    run_mpi(spark, _interpreters, ranks=2, output=None).collect()
    time.sleep(1.5)
    out = run_mpi(spark, _interpreters, ranks=2, env={"PYTHONPATH": "/opt/extra"}, output=None)
    assert all(not spare and "/opt/extra" in path for spare, path in out.collect())


@pytest.mark.parametrize("ranks", [0, -2, 1.5])
def test_bad_rank_counts_are_refused(spark, ranks):
    with pytest.raises(ValueError, match="ranks must be a positive integer"):
        run_mpi(spark, lambda comm, rows: [], ranks=ranks)


def test_non_callable_is_refused(spark):
    with pytest.raises(TypeError, match="must be callable"):
        run_mpi(spark, "not a function", ranks=1)


def squares_on_workers(comm, rows):
    import os

    from mpi4py.futures import MPICommExecutor

    with MPICommExecutor(comm, root=0) as executor:
        if executor is not None:
            squares = list(executor.map(pow, range(6), [2] * 6))
            yield squares, executor.submit(os.getpid).result() != os.getpid()


def test_mpi4py_futures_comm_executor_on_the_job_ranks(spark):
    """Tasks pickled by reference (builtins here; a script's own functions in the examples
    test) run on the other rank."""
    assert run_mpi(spark, squares_on_workers, ranks=2).collect() == [([0, 1, 4, 9, 16, 25], True)]


def pool_on_spawned_workers(comm, rows):
    import os

    from mpi4py.futures import MPIPoolExecutor

    with MPIPoolExecutor(max_workers=1) as pool:
        squares = list(pool.map(pow, range(6), [2] * 6))
        yield comm.rank, squares, pool.submit(os.getpid).result() != os.getpid()


def test_mpi4py_futures_pool_executor_spawns_its_workers(spark):
    """MPIPoolExecutor's workers start with MPI_Comm_spawn beside each rank."""
    out = run_mpi(spark, pool_on_spawned_workers, ranks=2, output=None).collect()
    assert out == [(rank, [0, 1, 4, 9, 16, 25], True) for rank in range(2)]


def test_thread_settings_need_a_fresh_interpreter():
    from sparkmpi.runner.spare import _needs_fresh_interpreter

    started = {"PATH": "/usr/bin", "OMP_NUM_THREADS": "2"}
    for key in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS", "PYTHONPATH"):
        assert _needs_fresh_interpreter(started, {**started, key: "1"})  # read at start-up
    assert _needs_fresh_interpreter(started, {**started, "OMP_NUM_THREADS": "1"})
    assert not _needs_fresh_interpreter(started, {**started, "BEAMLINE": "8-ID"})  # read later
