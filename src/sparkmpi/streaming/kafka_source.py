"""Kafka, the driver's side: follows the control topic (scan-start, progress, scan-end), turns
delivered frames into offset ranges for the ranks to read, commits the frames topic's offsets
after each durable batch, and the control topic's once scans are finished, so a restarted
driver neither misses an unfinished scan nor replays finished ones."""

from __future__ import annotations

import time
from collections.abc import Mapping

from sparkmpi.streaming.kafka_transport import (
    HEADER,
    Backoff,
    KafkaRange,
    ResultsTopic,
    check_broker,
    consume,
    consumer_config,
    ensure_topics,
)
from sparkmpi.streaming.protocol import MalformedRecord, ScanEnd, ScanStart, decode


class KafkaSource:
    """Driver side: follows the control topic and turns delivered frames into offset ranges."""

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        group: str | None = None,
        log=print,
        config: Mapping[str, str] | None = None,
    ):
        from confluent_kafka import Consumer, TopicPartition

        check_broker(bootstrap, config=config)
        self.config = dict(config or {})
        self.partitions = ensure_topics(bootstrap, topic, config=self.config)
        self.bootstrap, self.topic, self.log = bootstrap, topic, log
        self.group = group or f"sparkmpi-{topic}"
        self._errors: list[str] = []
        self.control = Consumer(
            consumer_config(
                bootstrap,
                self.config,
                **{
                    "group.id": f"{self.group}-control",
                    "error_cb": lambda err: self._errors.append(str(err)),
                },
            )
        )
        self._control_partition = TopicPartition(f"{topic}.control", 0)
        committed = self.control.committed([self._control_partition], timeout=10)[0].offset
        self.control.assign([TopicPartition(f"{topic}.control", 0, max(committed, 0))])
        self._start_offsets: dict[str, int] = {}  # control offset of each scan's scan-start
        self._finished: set[str] = set()
        self._control_next = max(committed, 0)
        self.committer = Consumer(
            consumer_config(bootstrap, self.config, **{"group.id": self.group})
        )
        self.scan: ScanStart | None = None
        self._delivered: dict[str, dict[int, int]] = {}
        self._ended: set[str] = set()
        self.next_offset: dict[int, int] = {}
        self.backoff = Backoff(log)
        self._pending_starts: list[ScanStart] = []
        self._results = ResultsTopic(bootstrap, topic, self.config)

    def _poll_control(self, timeout: float) -> None:
        for msg in consume(self.control, timeout, self._errors, self.backoff):
            self._control_next = msg.offset() + 1
            try:
                record = decode(dict(msg.headers() or []).get(HEADER), msg.value())
            except MalformedRecord as exc:
                self.log(f"skipped a malformed control record: {exc}")
                continue
            if isinstance(record, ScanStart):
                self._start_offsets.setdefault(record.scan_id, msg.offset())
                self._pending_starts.append(record)
                continue
            # kept per scan: they may arrive before the driver has begun that scan
            delivered = self._delivered.setdefault(record.scan_id, {})
            for p, o in record.offsets.items():
                delivered[p] = max(delivered.get(p, 0), o)
            if isinstance(record, ScanEnd):
                self._ended.add(record.scan_id)

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

    def resume(self, scan: ScanStart) -> None:
        """Makes ``scan`` (saved by an earlier driver) the current scan."""
        self._begin(scan)

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
            KafkaRange(
                self.bootstrap,
                self.topic,
                p,
                self.next_offset.get(p, 0),
                end,
                tuple(sorted(self.config.items())),
            )
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

    def position(self) -> dict[str, int]:
        """Where the current scan's reading stands (partition -> next offset), for a
        checkpoint."""
        return {str(p): o for p, o in self.next_offset.items()}

    def seek(self, position: dict) -> None:
        """Reads on from a checkpoint's :meth:`position` (nothing to do when it is empty)."""
        for p, o in position.items():
            self.next_offset[int(p)] = int(o)

    def finished(self, scan_id: str) -> None:
        """``scan_id`` is done (final result durable, or refused): the control topic is
        committed up to the earliest scan-start of a scan that is not."""
        from confluent_kafka import KafkaException, TopicPartition

        self._finished.add(scan_id)
        open_starts = [o for s, o in self._start_offsets.items() if s not in self._finished]
        offset = min(open_starts, default=self._control_next)
        try:
            self.control.commit(
                offsets=[TopicPartition(self._control_partition.topic, 0, offset)],
                asynchronous=False,
            )
        except KafkaException as exc:  # only costs a re-read of finished scans' records
            self.log(f"kafka broker trouble ({exc}); control position not committed")

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
        self._results.publish(summary)

    def close(self) -> None:
        self.control.close()
        self.committer.close()
