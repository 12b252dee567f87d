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

This module finds scans and holds the session; :mod:`sparkmpi.streaming.batches` runs one
scan's batches. A source the ranks read themselves (Stream V2 with ``?clients=ranks``) gets
its session, and its ranks' sockets, before any scan starts.
"""

from __future__ import annotations

import os
import threading
import time
from functools import partial
from pathlib import Path

from sparkmpi.streaming.app import app_class
from sparkmpi.streaming.batches import ScanBatches, StreamFailed, StreamSettings
from sparkmpi.streaming.checkpoint import unfinished_scans
from sparkmpi.streaming.endpoints import open_source
from sparkmpi.streaming.protocol import MalformedRecord, check_scan_id
from sparkmpi.streaming.stream_v2_ranks import open_receiver, take_control

__all__ = ["StreamDriver", "StreamFailed", "StreamSettings", "scan_dir"]


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
        self.out_dir = Path(out_dir).absolute()  # result records name files anywhere
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
        summary = ScanBatches(self, scan, directory).run()
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
