"""Stream URLs: ``kafka://HOST:PORT/TOPIC`` and ``zmq://HOST:PORT``."""

from __future__ import annotations

from urllib.parse import urlparse

from sparkmpi.streaming.kafka_transport import StreamError


def parse(url: str) -> tuple[str, str, int, str]:
    """(scheme, host, port, topic) of a stream URL; :class:`StreamError` naming what is wrong."""
    parsed = urlparse(url)
    if parsed.scheme not in ("kafka", "zmq"):
        raise StreamError(
            f"{url}: stream URLs look like kafka://HOST:PORT/TOPIC or zmq://HOST:PORT"
        )
    try:
        port = parsed.port
    except ValueError:
        port = None
    if not parsed.hostname or port is None:
        raise StreamError(f"{url}: needs a host and a port")
    topic = parsed.path.strip("/")
    if parsed.scheme == "kafka" and not topic:
        raise StreamError(f"{url}: a Kafka URL needs a topic, kafka://HOST:PORT/TOPIC")
    return parsed.scheme, parsed.hostname, port, topic


def check(url: str) -> None:
    """Raises :class:`StreamError` if ``url`` is malformed or its Kafka broker does not answer."""
    scheme, host, port, _ = parse(url)
    if scheme == "kafka":
        from sparkmpi.streaming.kafka_transport import check_broker

        check_broker(f"{host}:{port}")


def open_source(url: str, log=print):
    """The driver-side source for ``url``."""
    scheme, host, port, topic = parse(url)
    if scheme == "kafka":
        from sparkmpi.streaming.kafka_transport import KafkaSource

        return KafkaSource(f"{host}:{port}", topic, log=log)
    from sparkmpi.streaming.zmq_transport import ZmqSource

    return ZmqSource(host, port, log=log)


def open_sink(url: str):
    """The producer-side sink for ``url``."""
    scheme, host, port, topic = parse(url)
    if scheme == "kafka":
        from sparkmpi.streaming.kafka_transport import KafkaSink

        return KafkaSink(f"{host}:{port}", topic)
    from sparkmpi.streaming.zmq_transport import ZmqSink

    return ZmqSink(host, port)
