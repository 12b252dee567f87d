"""Kafka transport: frames topic ``T`` (partitioned by frame index), control topic ``T.control``
(scan-start, progress, scan-end), results topic ``T.results``.

The driver reads only the small control topic; each batch is a set of offset ranges of the
frames topic, one per partition, that the rank processes read themselves on the workers.
Batch ends come from the producer's delivery reports (progress records), never from the
broker's high watermarks.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from sparkmpi.streaming.protocol import (
    HEADER,
    Frame,
    MalformedRecord,
    Progress,
    ScanEnd,
    ScanStart,
    decode,
    encode,
)

PARTITIONS = 4
PROGRESS_EVERY_S = 0.2
READ_TIMEOUT_S = 10.0


class StreamError(RuntimeError):
    """The stream cannot start or continue (broker unreachable, bad URL); one line."""


def _config(bootstrap: str, **extra) -> dict:
    # quiet: errors reach us through the API; short fetch waits: batches are latency-bound
    return {"bootstrap.servers": bootstrap, "log_level": 0, **extra}


def _consumer_config(bootstrap: str, **extra) -> dict:
    return _config(bootstrap, **{"fetch.wait.max.ms": 10, "enable.auto.commit": False, **extra})


def check_broker(bootstrap: str, timeout: float = 5.0) -> None:
    """Raises :class:`StreamError` unless a broker answers at ``bootstrap``."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    try:
        AdminClient(_config(bootstrap)).list_topics(timeout=timeout)
    except KafkaException as exc:
        error = exc.args[0]
        reason = error.str() if hasattr(error, "str") else str(error)
        raise StreamError(f"kafka://{bootstrap}: broker not reachable ({reason})") from None


def ensure_topics(bootstrap: str, topic: str, partitions: int = PARTITIONS) -> int:
    """Creates the frames, control and results topics of ``topic`` if they do not exist;
    returns how many partitions the frames topic has."""
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient(_config(bootstrap))
    existing = admin.list_topics(timeout=10).topics
    wanted = {topic: partitions, f"{topic}.control": 1, f"{topic}.results": 1}
    new = [NewTopic(t, n, 1) for t, n in wanted.items() if t not in existing]
    for future in admin.create_topics(new).values() if new else []:
        future.result(timeout=10)
    return max(len(existing[topic].partitions), 1) if topic in existing else partitions


class KafkaSink:
    """Producer side: publishes a scan's records and, from delivery reports, its progress."""

    def __init__(self, bootstrap: str, topic: str, partitions: int = PARTITIONS):
        from confluent_kafka import Producer

        check_broker(bootstrap)
        self.topic, self.partitions = topic, ensure_topics(bootstrap, topic, partitions)
        self.producer = Producer(_config(bootstrap, **{"linger.ms": 2}))
        self.delivered: dict[int, int] = {}
        self.failed = 0
        self._last_progress = 0.0
        self._scan_id = ""

    def send_raw(self, header: bytes | None, payload: bytes, partition: int = 0) -> None:
        """Publishes an arbitrary message to the frames topic, counted in the progress like a
        frame (for testing how the pipeline treats malformed records)."""
        headers = [] if header is None else [(HEADER, header)]
        self.producer.produce(
            self.topic,
            value=payload,
            partition=partition,
            headers=headers,
            on_delivery=self._on_delivery,
        )
        self.producer.flush(10)
        self._publish_progress()

    def _on_delivery(self, err, msg) -> None:
        if err is not None:
            self.failed += 1
            return
        p = msg.partition()
        self.delivered[p] = max(self.delivered.get(p, 0), msg.offset() + 1)

    def _control(self, record) -> None:
        header, payload = encode(record)
        self.producer.produce(f"{self.topic}.control", value=payload, headers=[(HEADER, header)])

    def send(self, record) -> None:
        if isinstance(record, ScanStart):
            self._scan_id = record.scan_id
            self._control(record)
            self.producer.flush(10)
        elif isinstance(record, Frame):
            header, payload = encode(record)
            self.producer.produce(
                self.topic,
                value=payload,
                key=str(record.index).encode(),
                partition=record.index % self.partitions,
                headers=[(HEADER, header)],
                on_delivery=self._on_delivery,
            )
            self.producer.poll(0)
            if time.monotonic() - self._last_progress > PROGRESS_EVERY_S:
                self._publish_progress()
        elif isinstance(record, ScanEnd):
            self.producer.flush(30)
            record.offsets = dict(self.delivered)
            self._control(record)
            self.producer.flush(10)
        else:
            self._control(record)

    def _publish_progress(self) -> None:
        self._last_progress = time.monotonic()
        if self.delivered:
            self._control(Progress(self._scan_id, dict(self.delivered)))

    def flush(self) -> None:
        """Returns once what is queued is delivered and how far it got is published."""
        self.producer.flush(10)
        self._publish_progress()
        self.producer.flush(10)

    def close(self) -> None:
        """Flushes (:meth:`flush`); the sink holds nothing else to release."""
        self.flush()


@dataclass(frozen=True)
class KafkaRange:
    """Offsets ``start`` (inclusive) to ``end`` (exclusive) of one partition of the frames topic."""

    bootstrap: str
    topic: str
    partition: int
    start: int
    end: int


_consumers: dict[str, object] = {}


def read_range(item: KafkaRange) -> tuple[list[tuple[bytes | None, bytes]], int]:
    """(header, payload) of the messages in ``item`` and the offset reached (``item.end`` unless
    the broker stopped answering within the read timeout). Runs in the rank processes; keeps
    one consumer per broker for the life of the process."""
    from confluent_kafka import Consumer, TopicPartition

    consumer = _consumers.get(item.bootstrap)
    if consumer is None:
        consumer = Consumer(_consumer_config(item.bootstrap, **{"group.id": "sparkmpi-readers"}))
        _consumers[item.bootstrap] = consumer
    consumer.assign([TopicPartition(item.topic, item.partition, item.start)])
    records, reached = [], item.start
    deadline = time.monotonic() + READ_TIMEOUT_S
    while reached < item.end and time.monotonic() < deadline:
        msg = consumer.poll(0.5)
        if msg is None or msg.error():
            continue
        if msg.offset() < reached:
            continue
        headers = dict(msg.headers() or [])
        records.append((headers.get(HEADER), msg.value() or b""))
        reached = msg.offset() + 1
    return records, reached


class KafkaSource:
    """Driver side: follows the control topic and turns delivered frames into offset ranges."""

    def __init__(self, bootstrap: str, topic: str, group: str | None = None, log=print):
        from confluent_kafka import Consumer, TopicPartition

        check_broker(bootstrap)
        self.partitions = ensure_topics(bootstrap, topic)
        self.bootstrap, self.topic, self.log = bootstrap, topic, log
        self.group = group or f"sparkmpi-{topic}"
        self._errors: list[str] = []
        self.control = Consumer(
            _consumer_config(
                bootstrap,
                **{
                    "group.id": f"{self.group}-control",
                    "error_cb": lambda err: self._errors.append(str(err)),
                },
            )
        )
        self.control.assign([TopicPartition(f"{topic}.control", 0, 0)])
        self.committer = Consumer(_consumer_config(bootstrap, **{"group.id": self.group}))
        self.scan: ScanStart | None = None
        self._delivered: dict[str, dict[int, int]] = {}
        self._ended: set[str] = set()
        self.next_offset: dict[int, int] = {}
        self._backoff = 0.0
        self._pending_starts: list[ScanStart] = []
        self._results = None  # the results producer, made on first use

    def _poll_control(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            msg = self.control.poll(max(0.0, min(0.1, deadline - time.monotonic())))
            if self._errors:
                trouble, self._errors = self._errors[-1], []
                self._broker_trouble(trouble)
                return
            if msg is None:
                if time.monotonic() >= deadline:
                    return
                continue
            if msg.error():
                self._broker_trouble(str(msg.error()))
                return
            self._backoff = 0.0
            try:
                record = decode(dict(msg.headers() or []).get(HEADER), msg.value())
            except MalformedRecord as exc:
                self.log(f"skipped a malformed control record: {exc}")
                continue
            if isinstance(record, ScanStart):
                self._pending_starts.append(record)
                continue
            # kept per scan: they may arrive before the driver has begun that scan
            delivered = self._delivered.setdefault(record.scan_id, {})
            for p, o in record.offsets.items():
                delivered[p] = max(delivered.get(p, 0), o)
            if isinstance(record, ScanEnd):
                self._ended.add(record.scan_id)

    def _broker_trouble(self, what: str) -> None:
        self._backoff = min(max(2 * self._backoff, 0.5), 8.0)
        self.log(f"kafka broker trouble ({what}); retrying in {self._backoff:.1f} s")
        time.sleep(self._backoff)

    def wait_for_scan(self, timeout: float | None = None, skip: set[str] = frozenset()):
        """The next scan-start record (not one of ``skip``), or None after ``timeout`` s."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            while self._pending_starts:
                start = self._pending_starts.pop(0)
                if start.scan_id not in skip and not any(
                    s.scan_id == start.scan_id for s in self._pending_starts
                ):
                    self._begin(start)
                    return start
            if deadline is not None and time.monotonic() > deadline:
                return None
            self._poll_control(0.5)

    def _begin(self, scan: ScanStart) -> None:
        from confluent_kafka import TopicPartition

        self.scan = scan
        parts = [TopicPartition(self.topic, p) for p in range(self.partitions)]
        committed = self.committer.committed(parts, timeout=10)
        self.next_offset = {tp.partition: max(tp.offset, 0) for tp in committed}

    @property
    def delivered(self) -> dict[int, int]:
        """End offsets of the current scan's delivered frames, per partition."""
        return self._delivered.get(self.scan.scan_id, {}) if self.scan else {}

    @property
    def ended(self) -> bool:
        return self.scan is not None and self.scan.scan_id in self._ended

    def poll(self, timeout: float = 0.0) -> list[KafkaRange]:
        """Offset ranges of frames delivered since the last batch (may be empty)."""
        self._poll_control(timeout)
        return [
            KafkaRange(self.bootstrap, self.topic, p, self.next_offset.get(p, 0), end)
            for p, end in sorted(self.delivered.items())
            if end > self.next_offset.get(p, 0)
        ]

    def complete(self) -> bool:
        """True once the scan ended and every delivered frame has been read."""
        return self.ended and all(
            self.next_offset.get(p, 0) >= end for p, end in self.delivered.items()
        )

    def advance(self, reached: dict[int, int], items: list) -> None:
        """Moves past what the ranks read (``reached``: partition -> next offset)."""
        for p, o in reached.items():
            self.next_offset[p] = max(self.next_offset.get(p, 0), o)

    def commit(self) -> None:
        """Commits the offsets read so far for the consumer group (after results are durable)."""
        from confluent_kafka import TopicPartition

        offsets = [TopicPartition(self.topic, p, o) for p, o in self.next_offset.items()]
        if offsets:
            self.committer.commit(offsets=offsets, asynchronous=False)

    def route(self, items: list[KafkaRange], ranks: int) -> list[list]:
        """Work per rank: partition p always goes to rank p % ranks (so a frame index, and any
        duplicate of it, always meets the same rank)."""
        work: list[list] = [[] for _ in range(ranks)]
        for item in items:
            work[item.partition % ranks].append(item)
        return work

    def publish_result(self, summary: dict) -> None:
        from confluent_kafka import Producer

        if self._results is None:
            self._results = Producer(_config(self.bootstrap))
        self._results.produce(f"{self.topic}.results", value=json.dumps(summary).encode())
        self._results.flush(5)

    def close(self) -> None:
        self.control.close()
        self.committer.close()
