"""DECTRIS Stream V2 read by the ranks (``stream-v2://DCU:31001?clients=ranks``): every rank of
the session connects a PULL socket of its own to the detector, which hands each message to one
client, round robin (the DECTRIS specification: "each message is only ever sent to a single
client"). So images arrive already spread over the ranks, and no image passes through the
driver.

A rank's receiving thread reads each message's header only. Images wait on the rank until a
batch takes them (:func:`take_images`, called by the rank step, which decodes them and sends
each to its owner rank); ``start`` and ``end`` messages, which may land on any rank, go to the
driver with the next call (:func:`take_control`), and the driver's
:class:`~sparkmpi.streaming.stream_v2.StreamV2Source` handles them as if its own socket had
received them. A message that cannot be used is dropped with its reason, reported the same way.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from sparkmpi.streaming.protocol import MalformedRecord

HELD_MAX = 100_000  # images a rank holds at most; older ones of other series go first


@dataclass(frozen=True)
class RankInput:
    """What a rank needs to connect to the detector."""

    endpoint: str
    max_message_bytes: int


class PullThread:
    """A PULL socket connected to ``spec.endpoint``, read by a daemon thread that gives every
    message to ``handle`` (which must not raise)."""

    def __init__(self, spec: RankInput, handle, name: str):
        import zmq

        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.PULL)
        self.socket.setsockopt(zmq.RCVHWM, 100_000)
        self.socket.setsockopt(zmq.MAXMSGSIZE, spec.max_message_bytes)  # bigger: peer dropped
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(spec.endpoint)
        self.handle = handle
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._receive, name=name, daemon=True)
        self.thread.start()

    def _receive(self) -> None:
        import zmq

        while not self.stop.is_set():
            try:
                if not self.socket.poll(100):
                    continue
                message = self.socket.recv()
            except zmq.ZMQError:
                return
            self.handle(message)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(2)
        self.socket.close(linger=0)
        self.context.term()


class _Receiver:
    """One rank's client of the detector: images kept by scan, control messages to relay."""

    def __init__(self, spec: RankInput):
        self.lock = threading.Lock()
        self.images: list = []
        self.control: list[bytes] = []
        self.rejected: list[str] = []
        self.served: set[str] = set()  # scans a batch has taken images of
        self.current: str | None = None  # the newest of them
        self.pull = PullThread(spec, self._on_message, "sparkmpi-sv2-rank")

    def _on_message(self, raw: bytes) -> None:
        try:
            self._take(raw)
        except MalformedRecord as exc:
            with self.lock:
                self.rejected.append(str(exc))
        except Exception as exc:  # a bad message never stops the thread
            with self.lock:
                self.rejected.append(f"{type(exc).__name__}: {exc}")

    def _take(self, raw: bytes) -> None:
        from sparkmpi.streaming.stream_v2 import StreamV2Image, image_key
        from sparkmpi.streaming.stream_v2_cbor import loads

        message = loads(raw)
        if message["type"] != "image":
            with self.lock:
                self.control.append(raw)
            return
        scan_id, index = image_key(message)
        with self.lock:
            if scan_id in self.served and scan_id != self.current:
                return  # a finished scan's straggler
            self.images.append(StreamV2Image(scan_id, index, raw, time.time()))
            if len(self.images) > HELD_MAX:
                self.images.pop(0)

    def take_images(self, scan_id: str) -> list:
        with self.lock:
            if scan_id != self.current:
                self.images = [m for m in self.images if m.scan_id not in self.served]
                self.current = scan_id
                self.served.add(scan_id)
            taken = [m for m in self.images if m.scan_id == scan_id]
            self.images = [m for m in self.images if m.scan_id != scan_id]
            return taken

    def take_control(self) -> tuple[list[bytes], list[str]]:
        with self.lock:
            control, rejected = self.control, self.rejected
            self.control, self.rejected = [], []
            return control, rejected


_receivers: dict[str, _Receiver] = {}


def open_receiver(spec: RankInput, comm, data=None) -> bool:
    """A session call: this rank's PULL socket to ``spec.endpoint`` (once per process)."""
    if spec.endpoint not in _receivers:
        _receivers[spec.endpoint] = _Receiver(spec)
    return True


def take_control(comm=None, data=None) -> tuple[list[bytes], list[str]]:
    """A session call: the ``start``/``end`` messages this rank received since the last call,
    and why it dropped any message."""
    control: list[bytes] = []
    rejected: list[str] = []
    for receiver in _receivers.values():
        more, why = receiver.take_control()
        control += more
        rejected += why
    return control, rejected


def take_images(scan_id: str) -> list:
    """The images of ``scan_id`` this rank received and no batch has taken yet."""
    return [m for receiver in _receivers.values() for m in receiver.take_images(scan_id)]
