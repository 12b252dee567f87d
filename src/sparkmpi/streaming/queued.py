"""What the push-style sources (ZeroMQ, DECTRIS Stream V2) share on the driver: a receiving
thread queues messages until a durable batch has processed them. Nothing can be replayed, so
there is no position to checkpoint or commit: what is queued and not yet durable is simply
still queued after a failed batch."""

from __future__ import annotations

import threading
import time

from sparkmpi.streaming.protocol import ScanStart


class QueuedSource:
    """A driver source over a queue. Subclasses call :meth:`_init_queue`, append to
    ``self._queue`` and ``self._starts`` and add to ``self._ended`` under ``self._lock``, and
    define :meth:`_mine` (the queued items the current scan's batches take) and ``route``."""

    def _init_queue(self) -> None:
        self.scan: ScanStart | None = None
        self._ended: set[str] = set()
        self._starts: list[ScanStart] = []
        self._queue: list = []
        self._lock = threading.Lock()

    def _mine(self) -> list:
        raise NotImplementedError

    def _skipped(self, scan_id: str) -> None:
        """A scan-start that :meth:`wait_for_scan` passed over (called under the lock)."""

    def wait_for_scan(self, timeout: float | None = None, skip: set[str] = frozenset()):
        """The next scan started and not in ``skip``, waiting up to ``timeout`` s (None: for
        ever); None if there is none by then."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while deadline is None or time.monotonic() < deadline:
            with self._lock:
                while self._starts:
                    start = self._starts.pop(0)
                    if start.scan_id not in skip:
                        self.scan = start
                        return start
                    self._skipped(start.scan_id)
            time.sleep(0.05)
        return None

    def resume(self, scan: ScanStart) -> None:
        """Makes ``scan`` (saved by an earlier driver) the current scan: what still comes for
        it is taken; what a dead driver had received and not made durable is lost."""
        with self._lock:
            self.scan = scan

    def poll(self, timeout: float = 0.0) -> list:
        """The current scan's queued items (after waiting ``timeout`` s)."""
        if timeout:
            time.sleep(timeout)
        with self._lock:
            return self._mine()

    @property
    def ended(self) -> bool:
        return self.scan is not None and self.scan.scan_id in self._ended

    def complete(self) -> bool:
        with self._lock:
            return self.ended and not self._mine()

    def advance(self, reached: dict[int, int], items: list) -> None:
        """Forgets ``items`` (returned by :meth:`poll`): they are durable."""
        done = {id(item) for item in items}
        with self._lock:
            self._queue = [m for m in self._queue if id(m) not in done]

    def position(self) -> dict:
        """Nothing can be replayed: no position to checkpoint."""
        return {}

    def seek(self, position: dict) -> None:
        """Nothing to do: what was received and not yet durable is still queued."""

    def finished(self, scan_id: str) -> None:
        """Nothing to do by default (no position to commit)."""

    def commit(self) -> None:
        """Nothing to commit."""

    def publish_result(self, summary: dict) -> None:
        """Push sources have no results channel: results are in the files and the log."""
