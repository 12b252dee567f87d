"""The batches of one scan, driven by :class:`~sparkmpi.streaming.driver.StreamDriver`: each
tick's frames become one call into the MPI session; its result, then ``state.json``, then the
source's commit make it durable; a failed batch ends the session and the next resumes from the
last durable checkpoint; after the scan-end (or when idle too long) the final result.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from sparkmpi.files import atomic_output
from sparkmpi.runner.errors import MPIJobError
from sparkmpi.streaming.checkpoint import Checkpoint
from sparkmpi.streaming.rankstep import rank_step

if TYPE_CHECKING:
    from sparkmpi.streaming.driver import StreamDriver


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


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


class ScanBatches:
    """The batches of one scan; :meth:`run` returns its final summary (None if stopped)."""

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
                if self.d.session is None:  # before taking the items: it may take seconds,
                    self.d.start_session()
                    active = max(active, time.monotonic())  # which are not idleness
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
