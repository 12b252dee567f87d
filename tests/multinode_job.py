"""A driver for the multi-node tests: ``python multinode_job.py MASTER RANKS [KEY=VALUE ...]``
runs ``run_mpi`` and an ``MPISession`` on RANKS ranks and prints one ``RESULT {json}`` line:
each rank's processor name, host name and Allreduce sum, and where the driver's PMI server
listened. ``--run-mpi-only`` skips the session."""

from __future__ import annotations

import json
import sys

from sparkmpi import MPISession, run_mpi
from sparkmpi.cli import parse_conf
from sparkmpi.runner.barrier import hub_for
from sparkmpi.runner.context import spark_session

ALLREDUCES = 20
ELEMENTS = 1 << 20  # 4 MB of float32 per Allreduce


def where_and_sum(comm, rows):
    import socket

    import numpy as np
    from mpi4py import MPI

    local = np.full(ELEMENTS, comm.rank + 1.0, dtype=np.float32)
    total = np.empty_like(local)
    for _ in range(ALLREDUCES):
        comm.Allreduce(local, total)
    yield comm.rank, MPI.Get_processor_name(), socket.gethostname(), float(total[0])


def in_session(comm, data):
    from mpi4py import MPI

    return comm.rank, MPI.Get_processor_name(), comm.allreduce(data)


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    master, ranks, conf = args[0], int(args[1]), parse_conf(args[2:])
    spark = spark_session(master, conf=conf, app_name="multi-node test")
    out: dict = {
        "run_mpi": sorted(run_mpi(spark, where_and_sum, ranks=ranks, output=None).collect())
    }
    if "--run-mpi-only" not in sys.argv:
        with MPISession(spark, ranks=ranks, output=None) as session:
            out["session"] = [session.run(in_session, data=[r + 1 for r in range(ranks)])]
            out["session"].append(session.run(in_session, data=[10] * ranks))
    hub = hub_for(spark.sparkContext)
    out["pmi_bind"], out["pmi_advertised"] = hub.pmi.host, hub.pmi.address[0]
    out["driver_host"] = spark.sparkContext.getConf().get("spark.driver.host")
    spark.stop()
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
