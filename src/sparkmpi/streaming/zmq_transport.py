"""ZeroMQ transport: the producer PUSHes multipart [JSON header, raw bytes] messages, like a
detector's stream interface; the driver PULLs them on a background thread.

ZeroMQ has no replay: frames received by a driver that dies are gone, so restarting a driver
mid-scan needs Kafka. Within one run every frame is still used once (ranks drop duplicates).
"""

from __future__ import annotations

import json
import threading
import time

from sparkmpi.streaming.protocol import MalformedRecord, ScanStart, decode, encode


class ZmqSink:
    """Producer side: connects a PUSH socket to ``tcp://host:port``."""

    def __init__(self, host: str, port: int):
        import zmq

        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.PUSH)
        self.socket.setsockopt(zmq.SNDHWM, 100_000)
        self.socket.setsockopt(zmq.LINGER, 30_000)  # a late driver still gets the scan
        self.socket.connect(f"tcp://{host}:{port}")

    def send(self, record) -> None:
        self.socket.send_multipart(list(encode(record)), copy=False)

    def send_raw(self, header: bytes | None, payload: bytes, partition: int = 0) -> None:
        """Sends an arbitrary message (for testing how the pipeline treats malformed records)."""
        self.socket.send_multipart([header or b"", payload])

    def close(self) -> None:
        self.socket.close()
        self.context.term()


class ZmqSource:
    """Driver side: binds a PULL socket and queues what arrives; frames are routed to ranks by
    index, so a duplicate always meets the rank that has the original."""

    def __init__(self, host: str, port: int, log=print):
        import zmq

        self.log = log
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.PULL)
        self.socket.setsockopt(zmq.RCVHWM, 100_000)
        self.socket.bind(f"tcp://{host}:{port}")
        self.scan: ScanStart | None = None
        self._ended: set[str] = set()
        self._starts: list[ScanStart] = []
        self._frames: list[tuple[int, bytes, bytes]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._receive, name="sparkmpi-zmq", daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        import zmq

        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(100):
                continue
            parts = self.socket.recv_multipart()
            header = parts[0] if parts else b""
            payload = parts[1] if len(parts) > 1 else b""
            try:
                meta = json.loads(header)
                kind = meta.get("type")
            except (ValueError, AttributeError):
                kind, meta = "frame", {}
            with self._lock:
                if kind == "scan-start":
                    try:
                        self._starts.append(decode(header, payload))
                    except MalformedRecord as exc:
                        self.log(f"skipped a malformed scan-start: {exc}")
                elif kind == "scan-end":
                    self._ended.add(str(meta.get("scan_id")))
                else:
                    index = meta.get("index", 0) if isinstance(meta, dict) else 0
                    self._frames.append(
                        (int(index) if str(index).isdigit() else 0, header, payload)
                    )

    def wait_for_scan(self, timeout: float | None = None, skip: set[str] = frozenset()):
        deadline = None if timeout is None else time.monotonic() + timeout
        while deadline is None or time.monotonic() < deadline:
            with self._lock:
                while self._starts:
                    start = self._starts.pop(0)
                    if start.scan_id not in skip:
                        self.scan = start
                        return start
            time.sleep(0.05)
        return None

    def poll(self, timeout: float = 0.0) -> list[tuple[int, bytes, bytes]]:
        """Frames received and not yet processed, as (index, header, payload)."""
        if timeout:
            time.sleep(timeout)
        with self._lock:
            return list(self._frames)

    @property
    def ended(self) -> bool:
        return self.scan is not None and self.scan.scan_id in self._ended

    def complete(self) -> bool:
        with self._lock:
            return self.ended and not self._frames

    def advance(self, reached: dict[int, int], items: list) -> None:
        """Forgets ``items`` (a prefix of what :meth:`poll` returned): they are processed."""
        with self._lock:
            del self._frames[: len(items)]

    def commit(self) -> None:
        return None

    def route(self, items: list[tuple[int, bytes, bytes]], ranks: int) -> list[list]:
        work: list[list] = [[] for _ in range(ranks)]
        for index, header, payload in items:
            work[index % ranks].append((header, payload))
        return work

    def publish_result(self, summary: dict) -> None:
        return None

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.socket.close(linger=0)
        self.context.term()
