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
from collections.abc import Mapping
from dataclasses import dataclass

from sparkmpi.streaming.protocol import (
    HEADER,
    Frame,
    Progress,
    ScanEnd,
    ScanStart,
    encode,
)

PARTITIONS = 4
PROGRESS_EVERY_S = 0.2
READ_TIMEOUT_S = 10.0


class StreamError(RuntimeError):
    """The stream cannot start or continue (broker unreachable, bad URL); one line."""


def client_config(bootstrap: str, config: Mapping[str, str] | None = None, **extra) -> dict:
    """librdkafka settings for ``bootstrap``: ``config`` (the user's, streaming.access) under
    the pipeline's own ``extra``, which win."""
    # quiet: errors reach us through the API; short fetch waits: batches are latency-bound.
    # ``config`` (streaming.access) come before the pipeline's own, which must win.
    return {"log_level": 0, **(config or {}), **extra, "bootstrap.servers": bootstrap}


def consumer_config(bootstrap: str, config: Mapping[str, str] | None = None, **extra) -> dict:
    """:func:`client_config` for a consumer that commits by hand and fetches without delay."""
    return client_config(
        bootstrap, config, **{"fetch.wait.max.ms": 10, "enable.auto.commit": False, **extra}
    )


def _reason(exc: Exception) -> str:
    error = exc.args[0] if exc.args else exc
    return " ".join((error.str() if hasattr(error, "str") else str(error)).split())


def check_broker(
    bootstrap: str, timeout: float = 5.0, config: Mapping[str, str] | None = None
) -> None:
    """Raises :class:`StreamError` (one line) unless a broker answers at ``bootstrap`` to a
    client made with ``config`` (extra librdkafka properties), or if those are not valid."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    errors: list[str] = []
    try:
        admin = AdminClient(
            client_config(bootstrap, config, error_cb=lambda e: errors.append(e.str()))
        )
    except (KafkaException, ValueError, TypeError) as exc:
        raise StreamError(f"kafka://{bootstrap}: bad Kafka settings ({_reason(exc)})") from None
    try:
        admin.list_topics(timeout=timeout)
    except KafkaException as exc:
        admin.poll(0)  # serves error_cb: the cause (a failed TLS handshake, ...) is there
        cause = next((e for e in errors if "brokers are down" not in e), "")
        hint = "" if config else "; a broker that needs TLS or SASL needs --kafka-config"
        reason = _reason(exc) + (f": {_reason(Exception(cause))}" if cause else "") + hint
        raise StreamError(f"kafka://{bootstrap}: broker not reachable ({reason})") from None


def ensure_topics(
    bootstrap: str,
    topic: str,
    partitions: int = PARTITIONS,
    config: Mapping[str, str] | None = None,
    companions: tuple[str, ...] = (".control", ".results"),
) -> int:
    """Creates ``topic`` (``partitions`` partitions) and its one-partition companion topics
    (``topic`` + each suffix) if they do not exist; one that another client creates meanwhile
    is fine. Returns how many partitions ``topic`` has."""
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient(client_config(bootstrap, config))
    existing = admin.list_topics(timeout=10).topics
    wanted = {topic: partitions, **{topic + suffix: 1 for suffix in companions}}
    new = [NewTopic(t, n, 1) for t, n in wanted.items() if t not in existing]
    for future in admin.create_topics(new).values() if new else []:
        try:
            future.result(timeout=10)
        except Exception as exc:  # made meanwhile by another client: fine
            if "exist" not in str(exc).lower():
                raise
    if topic in existing:
        return max(len(existing[topic].partitions), 1)
    return max(len(admin.list_topics(topic, timeout=10).topics[topic].partitions), 1)


class KafkaSink:
    """Producer side: publishes a scan's records and, from delivery reports, its progress."""

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        partitions: int = PARTITIONS,
        config: Mapping[str, str] | None = None,
    ):
        from confluent_kafka import Producer

        check_broker(bootstrap, config=config)
        self.topic = topic
        self.partitions = ensure_topics(bootstrap, topic, partitions, config)
        self.producer = Producer(client_config(bootstrap, config, **{"linger.ms": 2}))
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
        self.producer.produce(
            f"{self.topic}.control", value=payload, partition=0, headers=[(HEADER, header)]
        )

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
    """Offsets ``start`` (inclusive) to ``end`` (exclusive) of one partition of the frames topic;
    ``config``: the extra librdkafka properties the reading consumer is made with."""

    bootstrap: str
    topic: str
    partition: int
    start: int
    end: int
    config: tuple[tuple[str, str], ...] = ()


_consumers: dict[tuple[str, tuple[tuple[str, str], ...]], object] = {}


def read_range(item: KafkaRange) -> tuple[list[tuple[bytes | None, bytes]], int]:
    """(header, payload) of the messages in ``item`` and the offset reached (``item.end`` unless
    the broker stopped answering within the read timeout). Runs in the rank processes; keeps
    one consumer per broker and config for the life of the process."""
    from confluent_kafka import Consumer, TopicPartition

    key = (item.bootstrap, item.config)
    consumer = _consumers.get(key)
    if consumer is None:
        consumer = _consumers[key] = Consumer(
            consumer_config(item.bootstrap, dict(item.config), **{"group.id": "sparkmpi-readers"})
        )
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


class Backoff:
    """A broker in trouble: each :meth:`trouble` logs one line and waits twice as long as the
    last (0.5 s to 8 s); :meth:`reset` once messages flow again."""

    def __init__(self, log=print):
        self.log, self.wait = log, 0.0

    def trouble(self, what: str) -> None:
        self.wait = min(max(2 * self.wait, 0.5), 8.0)
        self.log(f"kafka broker trouble ({what}); retrying in {self.wait:.1f} s")
        time.sleep(self.wait)

    def reset(self) -> None:
        self.wait = 0.0


def consume(
    consumer, timeout: float, errors: list[str], backoff: Backoff, limit: int | None = None
):
    """Yields the messages ``consumer`` delivers within ``timeout`` s (at most ``limit``). A
    broker error — reported by the consumer's ``error_cb`` into ``errors``, or carried by a
    message — goes to ``backoff`` and ends the iteration; a good message resets it."""
    deadline = time.monotonic() + timeout
    count = 0
    while limit is None or count < limit:
        msg = consumer.poll(max(0.0, min(0.1, deadline - time.monotonic())))
        if errors:
            trouble = errors[-1]
            errors.clear()
            backoff.trouble(trouble)
            return
        if msg is None:
            if time.monotonic() >= deadline:
                return
            continue
        if msg.error():
            backoff.trouble(str(msg.error()))
            return
        backoff.reset()
        count += 1
        yield msg


class ResultsTopic:
    """Publishes batch summaries (JSON) to ``TOPIC.results``; the producer is made on first
    use."""

    def __init__(self, bootstrap: str, topic: str, config: Mapping[str, str] | None = None):
        self.bootstrap, self.topic, self.config = bootstrap, f"{topic}.results", config
        self._producer = None

    def publish(self, summary: dict) -> None:
        from confluent_kafka import Producer

        if self._producer is None:
            self._producer = Producer(client_config(self.bootstrap, self.config))
        self._producer.produce(self.topic, value=json.dumps(summary).encode())
        self._producer.flush(5)
