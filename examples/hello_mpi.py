"""A plain mpi4py program: run it with `spark-mpi run --ranks 2 examples/hello_mpi.py`
(or, for comparison, `mpiexec -n 2 python examples/hello_mpi.py`)."""

import socket

import numpy as np
from mpi4py import MPI

comm = MPI.COMM_WORLD
local = np.full(4, comm.rank + 1.0)
total = np.empty_like(local)
comm.Allreduce(local, total)
hosts = comm.gather(socket.gethostname(), root=0)
print(f"rank {comm.rank} of {comm.size}: Allreduce gave {total[0]:.0f}")
if comm.rank == 0:
    print("ranks run on", hosts)
