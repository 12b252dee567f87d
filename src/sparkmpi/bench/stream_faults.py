"""Faults injected into a streamed scan at deterministic points, and what they cost.

Each run streams one simulated scan through a ``spark-mpi stream run`` process (its own Spark)
in three parts. The producer sends part A, waits until a batch is durable, injects the fault,
waits until the fault has happened (never a timer), then sends parts B and C and the scan-end:

* ``driver-kill``: the driver's whole process group gets SIGKILL; a new driver is started
  (optionally with another rank count) and resumes from the checkpoint;
* ``rank-kill``: rank 1 stops in the middle of its next batch (frames read and durable, not
  yet iterated) and reports its PID; it gets SIGKILL;
* ``rank-hang``: the same rank stops there and is left hung: the batch deadline ends it;
* ``broker-freeze`` (Kafka): the broker process is stopped (SIGSTOP) for ``outage_s`` seconds
  and continued (SIGCONT), with the same data;
* ``none``: the undisturbed run to compare with.

Measured from the final result: frames lost and frames applied more than once (the ranks'
own counts), recoveries, the time from the fault until a batch with new frames was durable
again, and the final phase error against the simulated truth.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

FAULTS = ("none", "driver-kill", "rank-kill", "rank-hang", "broker-freeze")
FAULT_BATCH_TIMEOUT_S = 20.0  # the benchmark's batch deadline: what a hung rank costs


@dataclass(frozen=True)
class FaultRun:
    """How the driver runs: batch interval (s), iterations per batch and at the end, ranks
    (and ranks after a driver restart), the batch deadline (s) and the broker outage (s)."""

    batch_interval: float = 0.5
    iterations: int = 5
    final_iterations: int = 60
    ranks: int = 2
    restart_ranks: int | None = None
    batch_timeout: float = 30.0
    outage_s: float = 5.0
    timeout_s: float = 300.0


def _wait(condition, what: str, timeout: float, log_path: Path | None = None):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            tail = log_path.read_text()[-3000:] if log_path and log_path.exists() else ""
            raise TimeoutError(f"waited {timeout:.0f} s for {what}\n{tail}")
        time.sleep(0.05)


def _state(out: Path, scan_id: str) -> dict | None:
    try:
        return json.loads((out / scan_id / "checkpoint" / "state.json").read_text())
    except (OSError, ValueError):
        return None


class _Driver:
    """A ``spark-mpi stream run`` process in its own process group, logging to a file."""

    def __init__(self, url: str, out: Path, run: FaultRun, ranks: int, log: Path, env: dict):
        command = [sys.executable, "-m", "sparkmpi.cli", "stream", "run", "--source", url]
        command += ["--out", str(out), "--batch-interval", f"{run.batch_interval}s"]
        command += ["--iterations", str(run.iterations), "--ranks", str(ranks)]
        command += ["--final-iterations", str(run.final_iterations)]
        command += ["--batch-timeout", str(run.batch_timeout), "--wait", str(run.timeout_s)]
        self.log = log
        with open(log, "a") as sink:
            self.process = subprocess.Popen(
                command,
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, **env},
            )

    def kill(self) -> None:
        """SIGKILL to the driver, its JVM and everything they started."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(60)

    def wait(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise TimeoutError(f"driver still running after {timeout:.0f} s") from None


def run_fault(fault: str, url: str, scan, workdir: Path, run: FaultRun, broker=None) -> dict:
    """Streams ``scan`` to ``url`` with ``fault`` injected (see the module docstring); the
    figures of the run. ``broker`` (a started :class:`TansuBroker`) for ``broker-freeze``."""
    from sparkmpi.apps.ptycho.streaming import start_record
    from sparkmpi.streaming.endpoints import open_sink
    from sparkmpi.streaming.protocol import Frame, ScanEnd

    if fault not in FAULTS:
        raise ValueError(f"fault must be one of {', '.join(FAULTS)}, not {fault!r}")
    transport = url.split(":", 1)[0]
    scan_id = f"{fault}-{transport}"
    out, faults = workdir / "out", workdir / "faults"
    faults.mkdir(parents=True, exist_ok=True)
    log = workdir / f"{scan_id}.log"
    env = {"SPARKMPI_STREAM_FAULTS": str(faults)}
    frames = len(scan.intensities)
    part_a, part_b = frames // 3, 2 * frames // 3
    drivers = [_Driver(url, out, run, run.ranks, log, env)]
    sink = open_sink(url)

    def send(indices) -> None:
        for index in indices:
            sink.send(Frame(scan_id, index, scan.intensities[index], time.time()))
        if hasattr(sink, "flush"):
            sink.flush()  # Kafka: publish how far delivery got

    try:
        sink.send(start_record(scan, scan_id))
        send(range(part_a))
        durable = part_a if transport == "zmq" else 1  # ZeroMQ cannot replay what is lost
        _wait(
            lambda: (s := _state(out, scan_id)) and len(s["used"]) >= durable,
            "the first durable batch",
            run.timeout_s,
            log,
        )
        fault_time, outage = time.time(), 0.0
        if fault == "driver-kill":
            drivers[0].kill()
            drivers.append(_Driver(url, out, run, run.restart_ranks or run.ranks, log, env))
            send(range(part_a, part_b))
        elif fault in ("rank-kill", "rank-hang"):
            (faults / f"{scan_id}.request").write_text(json.dumps({"rank": 1}))
            send(range(part_a, part_b))
            fired = faults / f"{scan_id}.fired"
            info = _wait(
                lambda: fired.exists() and fired.read_text() and json.loads(fired.read_text()),
                "the rank to reach the fault point",
                run.timeout_s,
                log,
            )
            fault_time = info["time"]
            if fault == "rank-kill":
                os.kill(info["pid"], signal.SIGKILL)
        elif fault == "broker-freeze":
            os.kill(broker.process.pid, signal.SIGSTOP)
            try:
                send_start = time.monotonic()
                for index in range(part_a, part_b):  # queued by the producer meanwhile
                    sink.send(Frame(scan_id, index, scan.intensities[index], time.time()))
                time.sleep(max(0.0, run.outage_s - (time.monotonic() - send_start)))
            finally:
                os.kill(broker.process.pid, signal.SIGCONT)
            outage = time.time() - fault_time
            sink.flush()
        else:
            send(range(part_a, part_b))
        send(range(part_b, frames))
        sink.send(ScanEnd(scan_id, time.time()))
        if hasattr(sink, "flush"):
            sink.flush()
        code = drivers[-1].wait(run.timeout_s)
        if code != 0:
            raise RuntimeError(f"{scan_id}: driver exited with {code}\n{log.read_text()[-3000:]}")
    finally:
        sink.close()
        for driver in drivers:
            if driver.process.poll() is None:
                driver.kill()
    figures = _figures(out / scan_id, scan, fault_time if fault != "none" else None)
    return {"fault": fault, "transport": transport, "outage_s": outage, **figures}


def _figures(directory: Path, scan, fault_time: float | None) -> dict:
    import h5py

    from sparkmpi.apps.ptycho.solver import phase_error

    with h5py.File(directory / "final.h5") as f:
        applied = f["applied"][()]
        summary = json.loads(f.attrs["summary"])
        obj, illumination = f["object"][()], f["illumination"][()]
    lit = (illumination > 0.5 * illumination.max()).astype(float)
    batches = []
    for path in directory.glob("batch-*.h5"):
        with h5py.File(path) as f:
            batches.append(json.loads(f.attrs["summary"]))
    flowing = [
        b["time"]
        for b in batches
        if fault_time is not None and b["time"] > fault_time and b["new_frames"] > 0
    ]
    return {
        "frames": len(applied),
        "frames_lost": int((applied == 0).sum()),
        "frames_applied_twice": int((applied > 1).sum()),
        "recoveries": summary["recoveries"],
        "resumed_after_s": min(flowing) - fault_time if flowing else None,
        "phase_error": phase_error(obj, scan.truth_object, lit, remove_ramp=True),
        "final_error": summary["error"],
        "last_frame_to_result_s": summary["last_frame_to_result_s"],
    }


def main(args) -> int:
    """``spark-mpi bench stream --faults``: every fault over each transport, and the table."""
    import tempfile

    from sparkmpi.apps.ptycho.simulate import simulate
    from sparkmpi.bench.report import print_table, table_plot, write_json
    from sparkmpi.deploy.ports import free_port
    from sparkmpi.streaming.broker import TansuBroker

    frames, size = (48, 32) if args.quick else (args.frames, args.size)
    scan = simulate(frames, size)
    run = FaultRun(
        batch_interval=args.batch_interval,
        iterations=args.iterations,
        final_iterations=args.final_iterations,
        batch_timeout=FAULT_BATCH_TIMEOUT_S,
    )
    results = []
    with TansuBroker() as broker, tempfile.TemporaryDirectory() as tmp:
        for transport in args.transports.split(","):
            baseline = None
            for fault in FAULTS:
                if fault == "broker-freeze" and transport != "kafka":
                    continue
                topic = f"{broker.url}/faults-{fault}"
                url = topic if transport == "kafka" else f"zmq://127.0.0.1:{free_port()}"
                print(f"{transport}: {fault} ...", flush=True)
                figures = run_fault(fault, url, scan, Path(tmp) / transport, run, broker)
                baseline = baseline or figures["phase_error"]
                figures["error_vs_undisturbed"] = figures["phase_error"] / baseline
                results.append(figures)
    columns = ["transport", "fault", "lost", "twice", "recoveries", "flowing again after s"]
    columns += ["phase error rad", "vs undisturbed"]
    rows = [
        [
            r["transport"],
            r["fault"],
            r["frames_lost"],
            r["frames_applied_twice"],
            r["recoveries"],
            "-" if r["resumed_after_s"] is None else f"{r['resumed_after_s']:.1f}",
            f"{r['phase_error']:.2e}",
            f"{r['error_vs_undisturbed']:.2f}x",
        ]
        for r in results
    ]
    title = (
        f"Faults in a streamed scan of {frames} frames of {size}², batches every "
        f"{run.batch_interval:g} s, batch deadline {run.batch_timeout:g} s, 2 ranks"
    )
    print_table(title, columns, rows)
    write_json(args.json, {"results": results, "run": vars(run), "frames": frames, "size": size})
    table_plot(args.plot, title, columns, [[str(v) for v in row] for row in rows])
    return 0
