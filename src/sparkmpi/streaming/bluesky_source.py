"""``bluesky+kafka://HOST:PORT/TOPIC``: the driver follows Bluesky run documents published by
``bluesky_kafka.Publisher`` (MessagePack ``(name, doc)`` pairs, numpy arrays as
msgpack-numpy) and turns each run with ``sparkmpi`` metadata into a scan
(:mod:`sparkmpi.streaming.bluesky_docs`; docs/streaming-bluesky.md).

Offsets: the documents topic is committed, for the consumer group, up to the first document of
the oldest run not finished, so a restarted driver reads every unfinished run again from its
start document; within a run, :meth:`BlueskySource.position` (in the checkpoint) says which
events the ranks already hold, and those are not handed out again.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

from sparkmpi.streaming.bluesky_docs import Run, Translator
from sparkmpi.streaming.kafka_transport import (
    Backoff,
    ResultsTopic,
    check_broker,
    consume,
    consumer_config,
    ensure_topics,
)
from sparkmpi.streaming.protocol import ScanStart

MAX_MESSAGES_PER_POLL = 10_000


def _decode(value: bytes | None) -> tuple[str, dict]:
    """(name, doc) of one Publisher message; ValueError saying why when it is not one."""
    import msgpack
    import msgpack_numpy

    try:
        message = msgpack.unpackb(
            value or b"", object_hook=msgpack_numpy.decode, raw=False, strict_map_key=False
        )
    except Exception as exc:  # msgpack raises several kinds on damaged input
        raise ValueError(f"not MessagePack ({type(exc).__name__}: {exc})") from None
    if (
        not isinstance(message, list | tuple)
        or len(message) != 2
        or not isinstance(message[0], str)
    ):
        raise ValueError("not a MessagePack (name, document) pair")
    return message[0], message[1]


class BlueskySource:
    """Driver side: reads the documents topic and serves one run at a time as a scan."""

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        group: str | None = None,
        log=print,
        config: Mapping[str, str] | None = None,
        data_roots: tuple[str, ...] = (),
    ):
        from confluent_kafka import Consumer, TopicPartition

        check_broker(bootstrap, config=config)
        self.bootstrap, self.topic, self.log = bootstrap, topic, log
        self.config = dict(config or {})
        self.partitions = ensure_topics(bootstrap, topic, 1, self.config, (".results",))
        self.group = group or f"sparkmpi-bluesky-{topic}"
        self._errors: list[str] = []
        self.consumer = Consumer(
            consumer_config(
                bootstrap,
                self.config,
                **{
                    "group.id": self.group,
                    "auto.offset.reset": "earliest",
                    "error_cb": lambda e: self._errors.append(str(e)),
                },
            )
        )
        parts = [TopicPartition(topic, p) for p in range(self.partitions)]
        committed = self.consumer.committed(parts, timeout=10)
        self._next = {tp.partition: max(tp.offset, 0) for tp in committed}
        self.consumer.assign([TopicPartition(topic, p, o) for p, o in self._next.items()])
        self.docs = Translator(log=log, data_roots=data_roots)
        self.scan: ScanStart | None = None
        self._seek: dict[str, dict[int, int]] = {}
        self.backoff = Backoff(log)
        self._results = ResultsTopic(bootstrap, topic, self.config)

    def _read(self, timeout: float) -> None:
        """Feeds the documents that arrive within ``timeout`` s (all already there first)."""
        messages = consume(
            self.consumer, timeout, self._errors, self.backoff, MAX_MESSAGES_PER_POLL
        )
        for msg in messages:
            partition, offset = msg.partition(), msg.offset()
            self._next[partition] = offset + 1
            try:
                name, doc = _decode(msg.value())
            except ValueError as exc:
                self.log(f"skipped a bluesky message at offset {offset}: {exc}")
                continue
            self.docs.feed(partition, offset, name, doc)
            self._apply_seek()

    def _apply_seek(self) -> None:
        for scan_id, position in list(self._seek.items()):
            run = self.docs.runs.get(scan_id)
            if run is not None:
                del self._seek[scan_id]
                run.skip_below.update(position)
                run.pending = [e for e in run.pending if e[1] >= position.get(e[0], 0)]
                run.handed.update(position)

    def _run(self) -> Run | None:
        return self.docs.runs.get(self.scan.scan_id) if self.scan else None

    def wait_for_scan(self, timeout: float | None = None, skip: set[str] = frozenset()):
        """The next run (not one of ``skip``) whose scan is known, as a :class:`ScanStart`, or
        None after ``timeout`` s; runs in ``skip`` are dropped (they are finished)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            for run in list(self.docs.runs.values()):
                if run.finished or run.scan is None:
                    continue
                if run.scan_id in skip:
                    self.docs.forget(run)
                    continue
                self.scan = run.scan
                return run.scan
            if deadline is not None and time.monotonic() > deadline:
                return None
            self._read(0.5)

    def resume(self, scan: ScanStart) -> None:
        """Makes ``scan`` (saved by an earlier driver) the current scan; its run is rebuilt as
        its documents are read again."""
        self.scan = scan

    @property
    def ended(self) -> bool:
        run = self._run()
        return run is not None and run.ended

    def poll(self, timeout: float = 0.0) -> list[tuple]:
        """The current run's work items not yet processed: (partition, offset, index, item)."""
        self._read(timeout)
        run = self._run()
        return list(run.pending) if run else []

    def complete(self) -> bool:
        """True once the run's stop document is read and all its items are processed."""
        run = self._run()
        return run is not None and run.ended and not run.pending

    def advance(self, reached: dict[int, int], items: list) -> None:
        """Forgets ``items`` (returned by :meth:`poll`): they are processed."""
        run = self._run()
        if run is None:
            return
        done = {id(item) for item in items}
        run.pending = [e for e in run.pending if id(e) not in done]
        for partition, offset, _, _ in items:
            run.handed[partition] = max(run.handed.get(partition, 0), offset + 1)

    def position(self) -> dict[str, int]:
        """Per partition, the offset below which the run's events are processed."""
        run = self._run()
        return {str(p): o for p, o in run.handed.items()} if run else {}

    def seek(self, position: dict) -> None:
        """Events of the current run below ``position`` (from :meth:`position`) are not
        handed out again, whether their documents were read already or are read later."""
        if self.scan is not None and position:
            self._seek[self.scan.scan_id] = {int(p): int(o) for p, o in position.items()}
            self._apply_seek()

    def finished(self, scan_id: str) -> None:
        """``scan_id`` is done: its run is forgotten and the topic committed past it."""
        run = self.docs.runs.get(scan_id)
        if run is not None:
            self.docs.forget(run)
        self.commit()

    def commit(self) -> None:
        """Commits, per partition, the first document of the oldest unfinished run (or what was
        read, if none), so a restart re-reads exactly the unfinished runs."""
        from confluent_kafka import KafkaException, TopicPartition

        offsets = dict(self._next)
        for run in self.docs.runs.values():
            if not run.finished:
                for p, o in run.first.items():
                    offsets[p] = min(offsets.get(p, o), o)
        try:
            self.consumer.commit(
                offsets=[TopicPartition(self.topic, p, o) for p, o in offsets.items()],
                asynchronous=False,
            )
        except KafkaException as exc:  # only costs a re-read of finished runs' documents
            self.log(f"kafka broker trouble ({exc}); documents position not committed")

    def route(self, items: list[tuple], ranks: int) -> list[list]:
        """Work per rank: frame ``index`` goes to rank ``index % ranks`` (its owner)."""
        work: list[list] = [[] for _ in range(ranks)]
        for _, _, index, item in items:
            work[index % ranks].append(item)
        return work

    def publish_result(self, summary: dict) -> None:
        """Publishes ``summary`` (JSON) to ``TOPIC.results``."""
        self._results.publish(summary)

    def close(self) -> None:
        self.consumer.close()
