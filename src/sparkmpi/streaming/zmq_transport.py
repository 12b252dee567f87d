"""ZeroMQ transport: the producer PUSHes multipart [JSON header, raw bytes] messages, like a
detector's stream interface; the driver PULLs them on a background thread.

ZeroMQ has no replay: frames received by a driver that dies are gone, so restarting a driver
mid-scan needs Kafka. Within one run every frame is still used once (ranks drop duplicates).
"""

from __future__ import annotations

import json
import threading
import time
from typing import TYPE_CHECKING

from sparkmpi.streaming.kafka_transport import StreamError
from sparkmpi.streaming.protocol import MalformedRecord, decode, encode
from sparkmpi.streaming.queued import QueuedSource

if TYPE_CHECKING:
    from sparkmpi.streaming.access import CurveKeys

LINGER_S = 30.0  # a late driver still gets the scan


MAX_MESSAGE_BYTES = 256 << 20


class ZmqSink:
    """Producer side: connects a PUSH socket to ``tcp://host:port``; with ``curve``, as a CURVE
    client with ``curve``'s client keys, to a driver holding ``curve.server_public``."""

    def __init__(self, host: str, port: int, curve: CurveKeys | None = None):
        import zmq

        self.endpoint = f"tcp://{host}:{port}"
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.PUSH)
        self.socket.setsockopt(zmq.SNDHWM, 100_000)
        self.socket.setsockopt(zmq.LINGER, int(LINGER_S * 1000))
        self._monitor = None
        self._accepted = self._refused = self._reported = False
        self._failed_handshakes = 0
        if curve is not None:
            public, secret = curve.client_pair()
            self.socket.curve_publickey, self.socket.curve_secretkey = public, secret
            self.socket.curve_serverkey = curve.server_public
            self._monitor = self.socket.get_monitor_socket(
                zmq.EVENT_HANDSHAKE_SUCCEEDED
                | zmq.EVENT_HANDSHAKE_FAILED_AUTH
                | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
            )
        self.socket.connect(self.endpoint)

    def _handshakes(self, timeout: float = 0.0) -> None:
        """Reads CURVE handshake outcomes until one decides (accepted or refused), waiting up to
        ``timeout`` s."""
        import zmq
        from zmq.utils.monitor import recv_monitor_message

        deadline = time.monotonic() + timeout
        while self._monitor is not None and not (self._accepted or self._refused):
            wait = max(0.0, deadline - time.monotonic())
            if not self._monitor.poll(int(wait * 1000)):
                return
            event = recv_monitor_message(self._monitor)["event"]
            self._accepted = event == zmq.EVENT_HANDSHAKE_SUCCEEDED
            # refused: ZAP said no (AUTH) or the driver is no CURVE server (PROTOCOL); a driver
            # without our server key's secret only ever drops the connection (NO_DETAIL),
            # which a driver closing mid-handshake does once too
            self._failed_handshakes += event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
            self._refused = self._failed_handshakes >= 3 or event in (
                zmq.EVENT_HANDSHAKE_FAILED_AUTH,
                zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
            )

    def _raise_if_refused(self) -> None:
        if self._refused and not self._accepted and not self._reported:
            self._reported = True
            raise StreamError(
                f"{self.endpoint}: the driver refused this producer's CURVE handshake (its "
                "client.key is not in the driver's authorized/ directory, server.key is not the "
                "driver's, or the driver runs without --zmq-keys)"
            )

    def send(self, record) -> None:
        """Queues ``record``; :class:`StreamError` once the driver has refused our keys."""
        self._handshakes()
        self._raise_if_refused()
        self.socket.send_multipart(list(encode(record)), copy=False)

    def send_raw(self, header: bytes | None, payload: bytes, partition: int = 0) -> None:
        """Sends an arbitrary message (for testing how the pipeline treats malformed records)."""
        self.socket.send_multipart([header or b"", payload])

    def close(self) -> None:
        """Gives what is queued up to 30 s to reach a driver, then releases the socket. With
        CURVE, :class:`StreamError` if no driver accepted our keys (nothing was delivered)."""
        start = time.monotonic()
        curve = self._monitor is not None
        if curve:
            self._handshakes(timeout=LINGER_S)
            self.socket.disable_monitor()
            self._monitor.close(linger=0)
        linger = 0.0 if curve and not self._accepted else LINGER_S
        self.socket.close(linger=int(max(0.0, linger - (time.monotonic() - start)) * 1000))
        self.context.term()
        self._raise_if_refused()
        if curve and not self._accepted and not self._reported:
            raise StreamError(
                f"{self.endpoint}: no driver completed a CURVE handshake within "
                f"{LINGER_S:.0f} s; nothing was delivered"
            )


class ZmqSource(QueuedSource):
    """Driver side: binds a PULL socket and queues what arrives; frames are routed to ranks by
    index, so a duplicate always meets the rank that has the original."""

    def __init__(self, host: str, port: int, log=print, curve: CurveKeys | None = None):
        import zmq

        self.log = log
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.PULL)
        self.socket.setsockopt(zmq.RCVHWM, 100_000)
        self.socket.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)  # a bigger one drops the peer
        self._auth = None
        if curve is not None:
            from zmq.auth.thread import ThreadAuthenticator

            public, secret = curve.server_pair()
            self._auth = ThreadAuthenticator(self.context)
            self._auth.start()
            # only producers whose public key is in authorized/ complete the handshake
            self._auth.configure_curve(domain="*", location=str(curve.authorized))
            self.socket.curve_publickey, self.socket.curve_secretkey = public, secret
            self.socket.curve_server = True
        try:
            self.socket.bind(f"tcp://{host}:{port}")
        except zmq.ZMQError:
            self._release()
            raise
        self._init_queue()  # of (scan id, index, header, payload)
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
                    meta = meta if isinstance(meta, dict) else {}
                    index = meta.get("index", 0)
                    self._queue.append(
                        (
                            str(meta.get("scan_id")),
                            int(index) if str(index).isdigit() else 0,
                            header,
                            payload,
                        )
                    )

    def _mine(self) -> list[tuple[str, int, bytes, bytes]]:
        """Queued messages for the current scan, and those of no scan that is waiting to start
        (they are reported as malformed); a waiting scan's frames stay queued for it."""
        waiting = {start.scan_id for start in self._starts}
        current = self.scan.scan_id if self.scan else None
        return [m for m in self._queue if m[0] == current or m[0] not in waiting]

    def route(self, items: list[tuple[str, int, bytes, bytes]], ranks: int) -> list[list]:
        """Work per rank: frame ``index`` goes to rank ``index % ranks`` (its owner)."""
        work: list[list] = [[] for _ in range(ranks)]
        for _, index, header, payload in items:
            work[index % ranks].append((header, payload))
        return work

    def _release(self) -> None:
        self.socket.close(linger=0)
        if self._auth is not None:
            self._auth.stop()
        self.context.term()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._release()
