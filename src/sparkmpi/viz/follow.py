"""Where live mode finds a streaming run's newest result: a results directory (the driver's
``--out``) or a Kafka results topic (``kafka://HOST:PORT/TOPIC`` reads ``TOPIC.results``)."""

from __future__ import annotations

import json
from pathlib import Path


class Follower:
    """``newest()`` returns the path of a result not returned before, or None."""

    def __init__(self, target: str, interval: float = 1.0):
        self.target, self.interval = target, interval
        self._seen: set[tuple[str, float]] = set()
        self._consumer = None
        if target.startswith("kafka://"):
            from sparkmpi.streaming.endpoints import parse
            from sparkmpi.streaming.kafka_transport import check_broker

            _, host, port, topic = parse(target)
            check_broker(f"{host}:{port}")
            from confluent_kafka import Consumer, TopicPartition

            self._consumer = Consumer(
                {
                    "bootstrap.servers": f"{host}:{port}",
                    "group.id": "sparkmpi-view",
                    "enable.auto.commit": False,
                    "log_level": 0,
                }
            )
            self._consumer.assign([TopicPartition(f"{topic}.results", 0, 0)])
        elif Path(target).exists() and not Path(target).is_dir():
            raise FileNotFoundError(f"{target}: not a results directory or kafka:// URL")

    @property
    def waiting_for_directory(self) -> bool:
        """True while a followed results directory does not exist yet (a run not started)."""
        return self._consumer is None and not Path(self.target).is_dir()

    def newest(self) -> str | None:
        if self._consumer is not None:
            latest = None
            while (msg := self._consumer.poll(0.05)) is not None:
                if not msg.error():
                    latest = json.loads(msg.value()).get("file")
            return latest
        files = list(Path(self.target).glob("*/batch-*.h5")) + list(
            Path(self.target).glob("*/final.h5")
        )
        if not files:
            return None
        newest = max(files, key=lambda p: p.stat().st_mtime)
        key = (str(newest), newest.stat().st_mtime)
        if key in self._seen:
            return None
        self._seen.add(key)
        return str(newest)
