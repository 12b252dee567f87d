"""``run_mpi`` and ``run_script``: an MPI job over the partitions of an RDD."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from sparkmpi.runner.barrier import BarrierJob, spark_context
from sparkmpi.runner.errors import MPIJobError
from sparkmpi.runner.functions import dumps_function
from sparkmpi.runner.hub import OutputSink, print_prefixed


def _check_ranks(ranks: int | None) -> None:
    if ranks is not None and (not isinstance(ranks, int) or ranks < 1):
        raise ValueError(f"ranks must be a positive integer, got {ranks!r}")


def _rdd_for(data, ranks: int | None):
    _check_ranks(ranks)
    if hasattr(data, "mapPartitions") and hasattr(data, "getNumPartitions"):
        rdd = data
    elif hasattr(data, "rdd") and hasattr(data, "schema"):
        rdd = data.rdd
    else:
        if ranks is None:
            raise ValueError("run_mpi without an RDD needs ranks=N")
        return spark_context(data).parallelize([], ranks)
    if ranks is not None and ranks != rdd.getNumPartitions():
        rdd = rdd.repartition(ranks)
    if rdd.getNumPartitions() < 1:
        raise ValueError("an RDD with no partitions has no ranks to run")
    return rdd


def run_mpi(
    data,
    fn: Callable[..., Iterable | None],
    ranks: int | None = None,
    *,
    runtime: str = "mpich",
    env: dict[str, str] | None = None,
    timeout: float | None = None,
    output: OutputSink | None = print_prefixed,
    pmi_host: str | None = None,
):
    """Runs ``fn(comm, rows)`` as one MPI rank per partition of ``data`` and returns its results.

    ``data`` is an RDD or DataFrame (rank ``r`` gets partition ``r``'s rows as an iterator), or
    a SparkSession/SparkContext with ``ranks=N`` (ranks get no rows). ``comm`` is the job's
    ``MPI.COMM_WORLD``. The job runs when this is called; the returned RDD holds what the ranks
    yielded, in rank order, cached on the executors (``unpersist()`` it when done). Any rank
    that raises, exits or is killed fails the whole job: every rank process is stopped and
    :class:`MPIJobError` names the rank with its traceback. ``runtime`` picks the MPI library
    (``"mpich"``, ``"impi"`` or ``"openmpi"``), ``env`` adds environment variables for the
    ranks, ``output`` receives their stdout/stderr (default: printed with a ``[rank N]``
    prefix).
    """
    from pyspark import StorageLevel

    fn_bytes = dumps_function(fn)
    rdd = _rdd_for(data, ranks)
    job = BarrierJob(
        rdd,
        "run",
        {"mode": "run", "fn": fn_bytes},
        runtime=runtime,
        env=env,
        output=output,
        pmi_host=pmi_host,
    )
    job.rdd = job.rdd.persist(StorageLevel.MEMORY_AND_DISK)
    try:
        job.run(lambda rdd: rdd.count(), timeout)
    except MPIJobError:
        job.rdd.unpersist()
        raise
    return job.rdd


def run_script(
    spark,
    script: str | Path,
    args: list[str] | None = None,
    ranks: int = 1,
    *,
    runtime: str = "mpich",
    env: dict[str, str] | None = None,
    timeout: float | None = None,
    output: OutputSink | None = print_prefixed,
    pmi_host: str | None = None,
) -> None:
    """Runs an mpi4py script as ``ranks`` ranks, as ``mpiexec -n ranks python script args`` would.

    The script's text is read here and shipped to the ranks, so it need not exist on the
    executors. Raises :class:`MPIJobError` if any rank fails or exits with a non-zero status.
    ``pmi_host`` is the driver address the executors reach (as for :func:`run_mpi`).
    """
    path = Path(script)
    try:
        source = path.read_text()
    except OSError as exc:
        raise FileNotFoundError(f"cannot read MPI script {path}: {exc.strerror}") from None
    _check_ranks(ranks)
    rdd = spark_context(spark).parallelize([], ranks)
    body = {"mode": "script", "script": (str(path), source, list(args or []))}
    job = BarrierJob(
        rdd, "script", body, runtime=runtime, env=env, output=output, pmi_host=pmi_host
    )
    job.run(lambda rdd: rdd.count(), timeout)
