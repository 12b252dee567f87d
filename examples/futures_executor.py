"""mpi4py.futures on the job's own ranks: rank 0 hands out tasks, the other ranks run them.

spark-mpi run --ranks 2 examples/futures_executor.py      (as under: mpiexec -n 2 python ...)

``MPICommExecutor`` needs no new processes, so it runs wherever the job's ranks run.
``MPIPoolExecutor`` spawns its workers instead: see examples/futures_pool.py.
"""

from mpi4py import MPI
from mpi4py.futures import MPICommExecutor


def square(x: int) -> tuple[int, int]:
    """x² and the rank that computed it."""
    return x * x, MPI.COMM_WORLD.rank


if __name__ == "__main__":
    with MPICommExecutor(MPI.COMM_WORLD, root=0) as executor:
        if executor is not None:  # only on the root
            results = list(executor.map(square, range(10)))
            workers = sorted({rank for _, rank in results})
            print(f"squares {[value for value, _ in results]} computed on ranks {workers}")
