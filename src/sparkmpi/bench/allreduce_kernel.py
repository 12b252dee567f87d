"""The MPI side of ``spark-mpi bench allreduce``, shared by Spark-MPI and plain ``mpiexec``.

Run under mpiexec as ``python -m sparkmpi.bench.allreduce_kernel SIZE REPEAT``: rank 0 prints
one JSON line with the median collective time and the checksum of the sum.
"""

from __future__ import annotations

import json
import statistics
import sys

import numpy as np


def make_array(index: int, size: int) -> np.ndarray:
    """Worker ``index``'s array: ``size`` float32 values, the same wherever it is made."""
    return np.random.default_rng(index).random(size, dtype=np.float32)


def expected_sum(count: int, size: int) -> np.ndarray:
    """The exact (float64) sum of the arrays of workers ``0 .. count-1``."""
    total = np.zeros(size, dtype=np.float64)
    for index in range(count):
        total += make_array(index, size)
    return total


def checksum(total: np.ndarray) -> float:
    return float(np.sum(total, dtype=np.float64))


def timed_allreduce(comm, local: np.ndarray, repeat: int) -> tuple[float, np.ndarray]:
    """Median seconds of ``MPI_Allreduce(SUM)`` of ``local`` over ``repeat`` calls after one
    warm-up call (each call's time is the slowest rank's), and the sum itself."""
    from mpi4py import MPI

    total = np.empty_like(local)
    comm.Allreduce(local, total, op=MPI.SUM)  # warm-up: connections, shared-memory segments
    times = []
    for _ in range(repeat):
        comm.Barrier()
        start = MPI.Wtime()
        comm.Allreduce(local, total, op=MPI.SUM)
        times.append(comm.allreduce(MPI.Wtime() - start, op=MPI.MAX))
    return statistics.median(times), total


def main(argv: list[str]) -> None:
    from mpi4py import MPI

    size, repeat = int(argv[0]), int(argv[1])
    comm = MPI.COMM_WORLD
    seconds, total = timed_allreduce(comm, make_array(comm.rank, size), repeat)
    if comm.rank == 0:
        print(json.dumps({"seconds": seconds, "checksum": checksum(total)}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
