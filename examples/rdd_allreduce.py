"""Sum the rows of an RDD with MPI_Allreduce across its partitions.

python examples/rdd_allreduce.py [--master spark://host:7077] [--ranks 2]
"""

import argparse

import numpy as np

from sparkmpi import run_mpi
from sparkmpi.runner.context import spark_session


def partial_sums(comm, rows):
    """Each rank sums its partition, then Allreduce makes every rank hold the total."""
    local = np.sum([row for row in rows], axis=0)
    total = np.empty_like(local)
    comm.Allreduce(local, total)
    yield comm.rank, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--master")
    parser.add_argument("--ranks", type=int, default=2)
    args = parser.parse_args()
    spark = spark_session(args.master, cores=args.ranks)
    rows = [np.full(3, float(i)) for i in range(100)]
    rdd = spark.sparkContext.parallelize(rows, args.ranks)
    for rank, total in run_mpi(rdd, partial_sums).collect():
        print(f"rank {rank}: {total}")
    spark.stop()


if __name__ == "__main__":
    main()
