"""The micro-batch driver: every batch interval, the frames that arrived become one call into a
persistent MPI session (a batch that runs past the interval is followed at once by the next);
the result is made durable, then the source position is committed, then the result is
published. After the scan-end record (or when the scan has been idle too long) the final
iterations run (for a direct app the last batch's result is the final one) and the final
result is published.

Exactly once: each frame goes to the rank that owns its index, which gives it to the app only
if it does not hold it yet, and counts what it gave; the driver sums those counts into every
result file (``applied``), so a frame lost or applied twice shows there. A batch's new frames
(written by the ranks) and its result (by the driver) are durable before ``state.json``
names them and before the Kafka offsets are committed.

Self-healing: a batch that fails (a rank dies or is lost) or misses its deadline ends the MPI
session; a new one starts from the last durable checkpoint (frames, solver result, source
position), up to ``max_recoveries`` times in a row; only then does the run fail.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np

from sparkmpi.files import atomic_output
from sparkmpi.runner.errors import MPIJobError
from sparkmpi.streaming.app import app_class
from sparkmpi.streaming.checkpoint import Checkpoint, unfinished_scans
from sparkmpi.streaming.endpoints import open_source
from sparkmpi.streaming.protocol import MalformedRecord, check_scan_id
from sparkmpi.streaming.rankstep import rank_step
from sparkmpi.streaming.stream_v2_ranks import open_receiver, take_control


@dataclass(frozen=True)
class StreamSettings:
    """Micro-batch interval (s), solver iterations per batch and after the scan, ranks; the
    deadline of one batch (s; None: 30 batch intervals, at least 60 s; the final step gets it
    in proportion to its iterations), failed batches in a row a run recovers from, and how
    long a scan may go without new frames and without its scan-end before it is closed as
    incomplete (s)."""

    batch_interval: float = 2.0
    iterations_per_batch: int = 10
    final_iterations: int = 50
    ranks: int = 2
    batch_timeout: float | None = None
    max_recoveries: int = 3
    idle_timeout: float = 300.0

    def deadline(self, iterations: int) -> float:
        """Seconds a step of ``iterations`` iterations may take."""
        base = self.batch_timeout or max(60.0, 30 * self.batch_interval)
        return base * max(1.0, iterations / max(self.iterations_per_batch, 1))


class StreamFailed(RuntimeError):
    """A scan could not go on: recoveries exhausted; the message is one line."""


def _write_h5(path: Path, result: dict, summary: dict) -> None:
    import h5py

    with atomic_output(path) as tmp, h5py.File(tmp, "w") as f:
        for key, value in result.items():
            f[key] = np.asarray(value)
        f.attrs["summary"] = json.dumps(summary)


class StreamDriver:
    """Runs scans from ``source_url`` through the streaming ``app`` on ``settings.ranks`` ranks,
    writing results under ``out_dir/<scan id>/``."""

    def __init__(
        self,
        spark,
        source_url: str,
        out_dir: str | os.PathLike,
        settings: StreamSettings | None = None,
        app: str = "ptycho",
        app_settings=None,
        log=print,
        access=None,
    ):
        self.spark, self.url, self.app = spark, source_url, app
        self.out_dir = Path(out_dir)
        self.settings = settings or StreamSettings()
        self.app_settings = app_settings
        self.log = log
        self._refused_scans: set[str] = set()
        self.app_class = app_class(app)  # unknown app: fail before connecting
        self.source = open_source(source_url, log=log, access=access)
        self.session = None
        self.stopping = threading.Event()
        self.history: list[dict] = []  # the current scan's batch summaries

    def stop(self) -> None:
        """Asks a running :meth:`run_scan` to return (None) at its next batch boundary."""
        self.stopping.set()

    def _finished_scans(self) -> set[str]:
        if not self.out_dir.is_dir():
            return set()
        return {d.name for d in self.out_dir.iterdir() if (d / "final.h5").exists()}

    def _accept(self, scan) -> Path:
        """The scan's directory; :class:`MalformedRecord` if the scan must be skipped."""
        self.app_class.check_start(scan)
        return scan_dir(self.out_dir, scan.scan_id)

    def run_scan(self, timeout: float | None = None) -> dict | None:
        """Waits (up to ``timeout`` s) for a scan not finished yet, streams it to its final
        result and returns the final summary (None if no scan started)."""
        while True:
            skip = self._finished_scans() | self._refused_scans
            saved = unfinished_scans(self.out_dir, skip)
            if saved:
                scan = saved[0]
                self.source.resume(scan)
            elif self.rank_input is not None:
                scan = self._wait_on_ranks(timeout, skip)
            else:
                scan = self.source.wait_for_scan(timeout, skip=skip)
            if scan is None:
                return None
            try:
                directory = self._accept(scan)
                break
            except MalformedRecord as exc:
                self.log(f"skipped a scan: {exc}")
                self._refused_scans.add(scan.scan_id)
                self.source.finished(scan.scan_id)
        self.log(f"scan {scan.scan_id}: {scan.frames} frames of {scan.shape}, streaming")
        self.history = []
        summary = _ScanRun(self, scan, directory).run()
        if summary is not None:
            self.source.finished(scan.scan_id)
        return summary

    def start_session(self) -> None:
        """Starts the MPI session if there is none (MPIJobError if it cannot start)."""
        from sparkmpi.runner import MPISession

        if self.session is None:
            self.session = MPISession(self.spark, self.settings.ranks)
            if self.rank_input is not None:  # every rank connects to the detector
                self.session.run(partial(open_receiver, self.rank_input), timeout=60)

    @property
    def rank_input(self):
        """What the ranks connect to when they read the source themselves, else None."""
        return getattr(self.source, "rank_input", None)

    def _wait_on_ranks(self, timeout: float | None, skip: set[str]):
        """:meth:`wait_for_scan` of a source the ranks read: their ``start`` messages are
        fetched every batch interval."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.stopping.is_set():
            self.start_session()
            for control, rejected in self.session.run(take_control, timeout=60):
                self.source.relay(control)
                for why in rejected:
                    self.log(f"skipped a malformed record: {why}")
            left = None if deadline is None else deadline - time.monotonic()
            wait = (
                self.settings.batch_interval
                if left is None
                else min(left, self.settings.batch_interval)
            )
            scan = self.source.wait_for_scan(max(wait, 0.0), skip=skip)
            if scan is not None or (left is not None and left <= 0):
                return scan
        return None

    def end_session(self) -> None:
        """Ends the MPI session, if any: every rank process is stopped."""
        if self.session is not None:
            session, self.session = self.session, None
            session.close()

    def close(self) -> None:
        self.end_session()
        self.source.close()

    def __enter__(self) -> StreamDriver:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def scan_dir(out_dir: Path, scan_id: str) -> Path:
    """``out_dir/scan_id``, checked to be a valid scan id naming a directory directly inside
    ``out_dir`` (after symlinks are resolved); :class:`MalformedRecord` otherwise."""
    base = Path(out_dir).resolve()
    path = (base / check_scan_id(scan_id)).resolve()
    if path.parent != base:
        raise MalformedRecord(f"scan {scan_id}: {path} is not inside the output {base}")
    return path


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


class _ScanRun:
    """The batches of one scan."""

    def __init__(self, driver: StreamDriver, scan, directory: Path):
        self.d, self.scan = driver, scan
        self.dir = directory
        self.ckpt = Checkpoint(directory)
        self.ckpt.save_start(scan)
        self.applied = np.zeros(scan.frames, dtype=np.int64)
        self.failures = 0
        self.last_produced = 0.0
        self.carried_malformed = 0  # seen in batches that brought no frame, not yet counted
        self._resume()
        if self.ckpt.resumed:
            state = self.ckpt.state
            driver.log(
                f"scan {scan.scan_id}: resuming after batch {state['batch']} with "
                f"{len(state['used'])} frames from the checkpoint"
            )

    def _resume(self) -> None:
        """Points the next batch at the last durable checkpoint: its frames go to the ranks
        again, its result seeds the solver, the source reads on from its position."""
        self.ckpt.discard_unlisted()
        self.restore = self.ckpt.restore_work(self.d.settings.ranks)
        self.last = None  # the batch result to finish with: none until a batch of this session
        self.restore_result = self.ckpt.state["result"]
        self.d.source.seek(self.ckpt.state["position"])

    def _step(self, work: list[list], iterations: int, skip_idle: bool = False) -> dict:
        step = {
            "batch": self.ckpt.state["batch"] + 1,
            "iterations": iterations,
            "frames_dir": str(self.ckpt.frames_dir),
            "restore": self.restore_result,
            "skip_idle": skip_idle,  # no iterations and no result if no frame came
        }
        fn = partial(rank_step, self.d.app, self.scan, self.d.app_settings, step)
        deadline = self.d.settings.deadline(iterations)
        results = self.d.session.run(fn, data=work, timeout=deadline)
        self.restore_result = None
        self.applied[:] = 0
        for r in results:
            np.add.at(self.applied, np.asarray(r["applied"][0], dtype=np.int64), r["applied"][1])
        malformed = [m for r in results for m in r["malformed"]]
        for message in malformed[:5]:
            self.d.log(f"skipped a malformed record: {message}")
        if len(malformed) > 5:
            self.d.log(f"skipped {len(malformed) - 5} more malformed records")
        if self.d.rank_input is not None:
            self.d.source.relay([m for r in results for m in r["control"]])
        produced = [r["newest_produced"] for r in results if r["newest_produced"] is not None]
        self.last_produced = max([self.last_produced, *produced])
        return {
            "result": results[0]["result"],
            "new": sorted(i for r in results for i in r["new"]),
            "files": [r["frames_file"] for r in results if r["frames_file"]],
            "duplicates": sum(r["duplicates"] for r in results),
            "malformed": len(malformed),
            "reached": {p: o for r in results for p, o in r["reached"].items()},
            "latest": max(produced, default=None),
        }

    def _durable(self, name: str, out: dict, items: list, final: bool, incomplete: bool) -> dict:
        """Result file, then state, then the source's commit, then publication."""
        source, state = self.d.source, self.ckpt.state
        result, now = out["result"], time.time()
        out = {**out, "malformed": out["malformed"] + self.carried_malformed}
        self.carried_malformed = 0
        used = sorted(set(state["used"]).union(out["new"]))
        twice = int((self.applied > 1).sum())
        summary = {
            "scan_id": self.scan.scan_id,
            "batch": state["batch"] + 1,
            "time": now,
            "final": final,
            "incomplete": incomplete,
            "new_frames": len(out["new"]),
            "frames_used": int((self.applied > 0).sum()),
            "frames_expected": self.scan.frames,
            "frames_applied_twice": twice,
            "error": result["errors"][-1] if result["errors"] else None,
            "iterations": len(result["errors"]),
            "latency_s": None if out["latest"] is None else now - out["latest"],
            "dropped_duplicates": state["dropped_duplicates"] + out["duplicates"],
            "malformed": state["malformed"] + out["malformed"],
            "recoveries": state["recoveries"],
            "file": str(self.dir / name),
        }
        if final:
            summary["last_frame_to_result_s"] = (
                now - self.last_produced if self.last_produced else None
            )
        frames = np.flatnonzero(self.applied)
        _write_h5(self.dir / name, {**result, "frames": frames, "applied": self.applied}, summary)
        source.advance(out["reached"], items)
        self.ckpt.write(
            batch=summary["batch"],
            frames_files=state["frames_files"] + out["files"],
            used=used,
            dropped_duplicates=summary["dropped_duplicates"],
            malformed=summary["malformed"],
            position=source.position(),
            result=str(self.dir / name),
            final=final,
        )
        source.commit()
        source.publish_result(summary)
        self.d.history.append(summary)
        self.failures = 0
        self._log_batch(summary, out)
        return summary

    def _log_batch(self, summary: dict, out: dict) -> None:
        line = f"batch {summary['batch']}: "
        if summary["error"] is None:
            line += "no frames yet"
        else:
            line += f"+{len(out['new'])} frames ({summary['frames_used']}/{self.scan.frames})"
            line += f", error {summary['error']:.2e}"
        if summary["latency_s"] is not None:
            line += f", latency {summary['latency_s']:.2f} s"
        if summary["frames_applied_twice"]:
            line += f", {summary['frames_applied_twice']} FRAMES APPLIED TWICE"
        self.d.log(line)

    def _recover(self, exc: BaseException) -> None:
        """Starts a new session from the last durable checkpoint, or raises
        :class:`StreamFailed` once ``max_recoveries`` batches in a row have failed."""
        limit, state = self.d.settings.max_recoveries, self.ckpt.state
        self.failures += 1
        what = f"scan {self.scan.scan_id}: batch {state['batch'] + 1} failed ({_first_line(exc)})"
        if self.failures > limit:
            raise StreamFailed(f"{what}; gave up after {limit} recoveries in a row") from exc
        self.d.log(
            f"{what}; recovery {self.failures}/{limit}: new MPI session, resuming after "
            f"batch {state['batch']}"
        )
        self.ckpt.write(recoveries=state["recoveries"] + 1)
        self._resume()
        self.d.end_session()  # the next tick starts a new one

    def run(self) -> dict | None:
        s, source = self.d.settings, self.d.source
        ranks = s.ranks
        next_tick = active = time.monotonic()  # the session starts at once
        while not self.d.stopping.is_set():
            source.poll(max(0.0, min(0.1, next_tick - time.monotonic())))
            if time.monotonic() < next_tick and not source.ended:
                continue
            try:
                self.d.start_session()  # before taking the items: it may take seconds
                items = source.poll(0.0)
                if items or any(self.restore) or self.d.rank_input is not None:
                    work = source.route(items, ranks)
                    for r in range(ranks):
                        work[r] = self.restore[r] + work[r]
                    self.restore = [[] for _ in range(ranks)]
                    out = self._step(work, s.iterations_per_batch, self.d.rank_input is not None)
                    if out["result"] is not None:  # None: nothing came (ranks reading)
                        active = time.monotonic()
                        self._durable(self._batch_name(), out, items, False, False)
                        self.last = out
                    else:
                        self.carried_malformed += out["malformed"]
                    self._note_batch(out)
                if source.complete():
                    return self._finish(incomplete=False)
                if time.monotonic() - active > s.idle_timeout:
                    return self._finish(incomplete=True)
            except MPIJobError as exc:
                self._recover(exc)
                active = time.monotonic()
            # batches start every interval, as Spark Streaming's do; one that ran late is
            # followed at once by the next
            next_tick = max(next_tick + s.batch_interval, time.monotonic())
        self.d.log(f"scan {self.scan.scan_id}: stopped after batch {self.ckpt.state['batch']}")
        return None

    def _note_batch(self, out: dict) -> None:
        note = getattr(self.d.source, "note_batch", None)
        if note is not None:
            note(len(out["new"]), int((self.applied > 0).sum()))

    def _batch_name(self) -> str:
        return f"batch-{self.ckpt.state['batch'] + 1:05d}.h5"

    def _finish(self, incomplete: bool) -> dict:
        s = self.d.settings
        iterations = s.final_iterations if self.ckpt.state["used"] else 0
        if self.last is not None and not getattr(self.d.app_class, "iterative", True):
            out = {**self.last, "new": [], "files": [], "duplicates": 0, "malformed": 0}
            out.update(reached={}, latest=None)  # the last batch's result is the final one
        else:
            out = self._step([[] for _ in range(s.ranks)], iterations)
        summary = self._durable("final.h5", out, [], final=True, incomplete=incomplete)
        if self.ckpt.state["used"]:
            title = f"scan {self.scan.scan_id}"
            self.d.app_class.picture(out["result"], self.dir / "final.png", title)
        missing = self.scan.frames - summary["frames_used"]
        closed = "closed as incomplete (idle)" if incomplete else "done"
        line = (
            f"scan {self.scan.scan_id} {closed}: {summary['frames_used']} frames used, "
            f"{missing} missing, {summary['frames_applied_twice']} applied twice"
        )
        if summary["last_frame_to_result_s"] is not None:
            line += f", final result {summary['last_frame_to_result_s']:.2f} s after the last frame"
        self.d.log(line)
        return {**summary, "frames_lost": missing, "settings": asdict(s)}
