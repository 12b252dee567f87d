"""A driver program that keeps an MPI job busy so that something can break under it.

``python -m sparkmpi.bench.fault_driver --master URL --ranks N [--conf K=V ...]`` runs
:func:`run_mpi` with ranks that loop on ``MPI_Allreduce`` and reports on stdout, one JSON object
per line:

* ``{"event": "ready", "ranks": {rank: {"host", "pid", "ppid"}}}`` once every rank is looping;
* ``{"event": "failed", "rank", "host", "message", "since_inject", "since_submit"}`` or
  ``{"event": "finished"}`` when the job ends.

A line ``inject`` on its stdin marks the moment the caller broke something (``since_inject`` is
counted from it). ``--fail-on FILE`` makes the last rank raise once ``FILE`` exists, after having
started a child in a session of its own (``--helper-pid-dir`` records that child's PID).
The fault benchmark and the multi-node tests run it in a subprocess.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from functools import partial


def busy_ranks(fail_on: str | None, helper_pid_dir: str | None, comm, rows):
    """Loops on ``MPI_Allreduce`` forever (or until ``fail_on`` exists, on the last rank)."""
    import os
    import socket
    import subprocess

    import numpy as np
    from mpi4py import MPI

    last = comm.rank == comm.size - 1
    if helper_pid_dir and last:
        helper = subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True
        )
        with open(os.path.join(helper_pid_dir, f"helper-{comm.rank}.pid"), "w") as out:
            out.write(str(helper.pid))
    local = np.ones(1 << 18, dtype=np.float32)
    total = np.empty_like(local)
    comm.Allreduce(local, total)
    info = {
        "rank": comm.rank,
        "host": MPI.Get_processor_name(),
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
        "ppid": os.getppid(),
    }
    print("BUSY " + json.dumps(info), flush=True)
    while True:
        comm.Allreduce(local, total)
        if fail_on and last and os.path.exists(fail_on):
            raise RuntimeError("rank failed after starting a helper in its own session")
    yield  # pragma: no cover - never reached


def emit(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


def main(argv: list[str] | None = None) -> int:
    from sparkmpi import MPIJobError, run_mpi
    from sparkmpi.cli import parse_conf
    from sparkmpi.runner.context import spark_session

    parser = argparse.ArgumentParser(prog="python -m sparkmpi.bench.fault_driver")
    parser.add_argument("--master", required=True)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--conf", action="append", default=[])
    parser.add_argument("--pmi-host")
    parser.add_argument("--fail-on")
    parser.add_argument("--helper-pid-dir")
    args = parser.parse_args(argv)

    busy: dict[int, dict] = {}
    injected: list[float] = []

    def sink(rank: int, stream: str, text: str) -> None:
        for line in text.splitlines():
            if line.startswith("BUSY "):
                info = json.loads(line[5:])
                busy[info["rank"]] = info
                if len(busy) == args.ranks:
                    emit(event="ready", ranks=busy)

    def listen() -> None:
        for line in sys.stdin:
            if line.strip() == "inject":
                injected.append(time.monotonic())

    threading.Thread(target=listen, daemon=True).start()
    spark = spark_session(args.master, conf=parse_conf(args.conf), app_name="fault driver")
    submitted = time.monotonic()
    try:
        run_mpi(
            spark,
            partial(busy_ranks, args.fail_on, args.helper_pid_dir),
            ranks=args.ranks,
            output=sink,
            pmi_host=args.pmi_host,
        )
        emit(event="finished")
    except MPIJobError as exc:
        now = time.monotonic()
        first = exc.reports[0] if exc.reports else {}
        emit(
            event="failed",
            rank=exc.rank,
            host=first.get("host"),
            message=str(exc).splitlines()[0],
            since_inject=now - injected[0] if injected else None,
            since_submit=now - submitted,
        )
    finally:
        spark.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
