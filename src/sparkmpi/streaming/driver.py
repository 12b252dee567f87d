"""The micro-batch driver: every batch interval, the frames that arrived become one call into a
persistent MPI session; the result is made durable, then the offsets are committed, then the
result is published. After the scan-end record the final iterations run and the final result
is published.

Exactly once: ranks drop frames they have seen; a batch's new frames are written (by the
ranks) and its result (by the driver) before its offsets are committed, and ``state.json``
lists only committed batches. A driver that dies and restarts re-reads from the committed
offsets, reloads the committed frames into the new ranks, and drops what it re-reads twice.
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
from sparkmpi.streaming.endpoints import open_source
from sparkmpi.streaming.protocol import MalformedRecord, check_scan_id
from sparkmpi.streaming.rankstep import app_class, rank_step


@dataclass(frozen=True)
class StreamSettings:
    """Micro-batch interval (s), solver iterations per batch and after the scan, ranks."""

    batch_interval: float = 2.0
    iterations_per_batch: int = 10
    final_iterations: int = 50
    ranks: int = 2


def _write_h5(path: Path, result: dict, summary: dict) -> None:
    import h5py

    with atomic_output(path) as tmp, h5py.File(tmp, "w") as f:
        for key, value in result.items():
            f[key] = np.asarray(value)
        f.attrs["summary"] = json.dumps(summary)


def _write_json(path: Path, data: dict) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(data))


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
    ):
        self.spark, self.url, self.app = spark, source_url, app
        self.out_dir = Path(out_dir)
        self.settings = settings or StreamSettings()
        self.app_settings = app_settings
        self.log = log
        self._refused_scans: set[str] = set()
        app_class(app)  # unknown app: fail before connecting
        self.source = open_source(source_url, log=log)
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

    def run_scan(self, timeout: float | None = None) -> dict | None:
        """Waits (up to ``timeout`` s) for a scan not finished yet, streams it to its final
        result and returns the final summary (None if no scan started)."""
        from sparkmpi.runner import MPISession

        while True:
            skip = self._finished_scans() | self._refused_scans
            scan = self.source.wait_for_scan(timeout, skip=skip)
            if scan is None:
                return None
            try:
                directory = scan_dir(self.out_dir, scan.scan_id)
                break
            except MalformedRecord as exc:
                self.log(f"skipped a scan: {exc}")
                self._refused_scans.add(scan.scan_id)
        self.log(f"scan {scan.scan_id}: {scan.frames} frames of {scan.shape}, streaming")
        if self.session is None:
            self.session = MPISession(self.spark, self.settings.ranks)
        self.history = []
        return _ScanRun(self, scan, directory).run()

    def close(self) -> None:
        if self.session is not None:
            self.session.close()
            self.session = None
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


class _ScanRun:
    """The batches of one scan."""

    def __init__(self, driver: StreamDriver, scan, directory: Path):
        self.d, self.scan = driver, scan
        self.dir = directory
        self.frames_dir = self.dir / "checkpoint" / "frames"
        self.frames_dir.mkdir(parents=True, exist_ok=True)
        self.state_path = self.dir / "checkpoint" / "state.json"
        self.state = {
            "batch": 0,
            "frames_files": [],
            "used": [],
            "dropped_duplicates": 0,
            "malformed": 0,
            "offsets": {},
        }
        self.restore: list[list] = [[] for _ in range(driver.settings.ranks)]
        if self.state_path.exists():
            self.state = json.loads(self.state_path.read_text())
            for i, path in enumerate(self.state["frames_files"]):
                rank = int(Path(path).stem.rsplit("-r", 1)[1]) if "-r" in path else i
                self.restore[rank % driver.settings.ranks].append(path)
            driver.log(
                f"scan {scan.scan_id}: resuming after batch {self.state['batch']} with "
                f"{len(self.state['used'])} frames from the checkpoint"
            )
        self.used = set(self.state["used"])
        self.last_produced = 0.0

    def _step(self, work: list[list], iterations: int, items: list) -> dict:
        step = {
            "batch": self.state["batch"] + 1,
            "iterations": iterations,
            "frames_dir": str(self.frames_dir),
        }
        fn = partial(rank_step, self.d.app, self.scan, self.d.app_settings, step)
        results = self.d.session.run(fn, data=work)
        new = [i for r in results for i in r["new"]]
        reached = {p: o for r in results for p, o in r["reached"].items()}
        malformed = [m for r in results for m in r["malformed"]]
        for message in malformed[:5]:
            self.d.log(f"skipped a malformed record: {message}")
        if len(malformed) > 5:
            self.d.log(f"skipped {len(malformed) - 5} more malformed records")
        produced = [r["newest_produced"] for r in results if r["newest_produced"] is not None]
        self.last_produced = max([self.last_produced, *produced])
        self.d.source.advance(reached, items)
        twice = self.used.intersection(new)
        self.used.update(new)
        self.state["batch"] = step["batch"]
        self.state["frames_files"] += [r["frames_file"] for r in results if r["frames_file"]]
        self.state["used"] = sorted(self.used)
        self.state["dropped_duplicates"] += sum(r["duplicates"] for r in results) + len(twice)
        self.state["malformed"] += len(malformed)
        self.state["offsets"] = {str(p): o for p, o in reached.items()}
        return {
            "result": results[0]["result"],
            "new": len(new),
            "latest": max(produced, default=None),
        }

    def _durable(self, name: str, out: dict, final: bool) -> dict:
        result = out["result"]
        now = time.time()
        summary = {
            "scan_id": self.scan.scan_id,
            "batch": self.state["batch"],
            "time": now,
            "final": final,
            "new_frames": out["new"],
            "frames_used": len(self.used),
            "frames_expected": self.scan.frames,
            "error": result["errors"][-1] if result["errors"] else None,
            "iterations": len(result["errors"]),
            "latency_s": None if out["latest"] is None else now - out["latest"],
            "dropped_duplicates": self.state["dropped_duplicates"],
            "malformed": self.state["malformed"],
            "file": str(self.dir / name),
        }
        if final:
            summary["last_frame_to_result_s"] = now - self.last_produced
        _write_h5(self.dir / name, {**result, "frames": sorted(self.used)}, summary)
        _write_json(self.state_path, {**self.state, "final": final})
        self.d.source.commit()
        self.d.source.publish_result(summary)
        self.d.history.append(summary)
        line = f"batch {summary['batch']}: "
        if summary["error"] is None:
            line += "no frames yet"
        else:
            line += f"+{out['new']} frames ({len(self.used)}/{self.scan.frames})"
            line += f", error {summary['error']:.2e}"
        if summary["latency_s"] is not None:
            line += f", latency {summary['latency_s']:.2f} s"
        self.d.log(line)
        return summary

    def run(self) -> dict | None:
        s = self.d.settings
        source, ranks = self.d.source, s.ranks
        next_tick = time.monotonic() + s.batch_interval
        while not self.d.stopping.is_set():
            source.poll(max(0.0, min(0.1, next_tick - time.monotonic())))
            if time.monotonic() < next_tick and not source.ended:
                continue
            items = source.poll(0.0)
            if items or any(self.restore):
                work = source.route(items, ranks)
                for r in range(ranks):
                    work[r] = self.restore[r] + work[r]
                self.restore = [[] for _ in range(ranks)]
                out = self._step(work, s.iterations_per_batch, items)
                self._durable(f"batch-{self.state['batch']:05d}.h5", out, final=False)
            if source.complete():
                return self._finish()
            next_tick = time.monotonic() + s.batch_interval
        self.d.log(f"scan {self.scan.scan_id}: stopped after batch {self.state['batch']}")
        return None

    def _finish(self) -> dict:
        s = self.d.settings
        out = self._step([[] for _ in range(s.ranks)], s.final_iterations, [])
        summary = self._durable("final.h5", out, final=True)
        picture = getattr(app_class(self.d.app), "picture", None)
        if picture is not None:
            picture(out["result"], self.dir / "final.png", f"scan {self.scan.scan_id}")
        missing = self.scan.frames - len(self.used)
        self.d.log(
            f"scan {self.scan.scan_id} done: {len(self.used)} frames used once, {missing} "
            f"missing, final result {summary['last_frame_to_result_s']:.2f} s after the last frame"
        )
        return {**summary, "frames_lost": missing, "settings": asdict(s)}
