"""mpi4py.futures with spawned workers: ``MPIPoolExecutor`` starts them with MPI_Comm_spawn.

spark-mpi run --ranks 1 examples/futures_pool.py          (as under: mpiexec -n 1 python ...)

The workers start as a Spark stage of their own when the cluster has free task slots, else
beside the rank that creates the pool, in its Spark task; they end with the job and their
output is relayed as ``[rank 0] [spawned N] ...``. The number of workers is
``max_workers`` (default: ``MPI4PY_FUTURES_MAX_WORKERS``, else 1 under spark-mpi, whose
universe is the job's own ranks).
"""

import socket

from mpi4py import MPI
from mpi4py.futures import MPIPoolExecutor


def cube(x: int) -> tuple[int, int]:
    """x³ and the process id of the worker that computed it."""
    import os

    return x**3, os.getpid()


if __name__ == "__main__":
    with MPIPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(cube, range(8)))
    workers = len({pid for _, pid in results})
    print(
        f"cubes {[value for value, _ in results]} from {workers} spawned worker(s) "
        f"for rank {MPI.COMM_WORLD.rank} on {socket.gethostname()}"
    )
