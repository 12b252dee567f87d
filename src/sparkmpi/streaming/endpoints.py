"""Stream URLs: ``kafka://HOST:PORT/TOPIC``, ``zmq://HOST:PORT`` and (sources only)
``bluesky+kafka://HOST:PORT/TOPIC`` and ``stream-v2://DETECTOR:PORT[?clients=ranks]``."""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlparse

from sparkmpi.streaming.kafka_transport import StreamError

if TYPE_CHECKING:
    from sparkmpi.streaming.access import StreamAccess


def parse(url: str) -> tuple[str, str, int, str]:
    """(scheme, host, port, topic) of a stream URL; :class:`StreamError` naming what is wrong."""
    parsed = urlparse(url)
    if parsed.scheme not in ("kafka", "zmq", "bluesky+kafka", "stream-v2"):
        raise StreamError(
            f"{url}: stream URLs look like kafka://HOST:PORT/TOPIC, zmq://HOST:PORT, "
            "bluesky+kafka://HOST:PORT/TOPIC or stream-v2://DETECTOR:PORT"
        )
    try:
        port = parsed.port
    except ValueError:
        port = None
    if not parsed.hostname or port is None:
        raise StreamError(f"{url}: needs a host and a port")
    topic = parsed.path.strip("/")
    if parsed.scheme in ("kafka", "bluesky+kafka") and not topic:
        raise StreamError(f"{url}: a Kafka URL needs a topic, {parsed.scheme}://HOST:PORT/TOPIC")
    return parsed.scheme, parsed.hostname, port, topic


def _clients(url: str) -> str:
    """Who connects to a Stream V2 detector: ``?clients=driver`` (the default: one socket on
    the driver) or ``?clients=ranks`` (one on every rank); :class:`StreamError` otherwise."""
    query = parse_qs(urlparse(url).query)
    unknown = set(query) - {"clients"}
    clients = query.get("clients", ["driver"])
    if unknown or len(clients) != 1 or clients[0] not in ("driver", "ranks"):
        raise StreamError(f"{url}: the only option is ?clients=driver or ?clients=ranks")
    return clients[0]


def check(url: str, access: StreamAccess | None = None) -> None:
    """Raises :class:`StreamError` if ``url`` is malformed, its Kafka broker does not answer a
    client made with ``access``'s Kafka settings, or (ZeroMQ) ``access``'s keys lack the
    driver's."""
    scheme, host, port, _ = parse(url)
    if scheme == "stream-v2":
        _clients(url)
    if scheme in ("kafka", "bluesky+kafka"):
        from sparkmpi.streaming.kafka_transport import check_broker

        check_broker(f"{host}:{port}", config=access.kafka_config if access else None)
    elif access is not None and access.curve is not None:
        access.curve.server_pair()


def open_source(url: str, log=print, access: StreamAccess | None = None):
    """The driver-side source for ``url``; with ``access``, its Kafka clients get
    ``access.kafka_config`` and a ZeroMQ source is a CURVE server for ``access.curve``."""
    scheme, host, port, topic = parse(url)
    if scheme == "kafka":
        from sparkmpi.streaming.kafka_source import KafkaSource

        config = access.kafka_config if access else None
        return KafkaSource(f"{host}:{port}", topic, log=log, config=config)
    if scheme == "bluesky+kafka":
        from sparkmpi.streaming.bluesky_source import BlueskySource

        config = access.kafka_config if access else None
        roots = access.data_roots if access else ()
        return BlueskySource(f"{host}:{port}", topic, log=log, config=config, data_roots=roots)
    if scheme == "stream-v2":  # DECTRIS Stream V2: connects to the detector's PUSH socket
        from sparkmpi.streaming.stream_v2 import StreamV2Source

        return StreamV2Source(host, port, log=log, on_ranks=_clients(url) == "ranks")
    from sparkmpi.streaming.zmq_transport import ZmqSource

    return ZmqSource(host, port, log=log, curve=access.curve if access else None)


def open_sink(url: str, access: StreamAccess | None = None):
    """The producer-side sink for ``url``; with ``access``, its Kafka clients get
    ``access.kafka_config`` and a ZeroMQ sink is a CURVE client with ``access.curve``."""
    scheme, host, port, topic = parse(url)
    if scheme == "bluesky+kafka":
        raise StreamError(
            f"{url}: a bluesky+kafka URL is only a source; publish with bluesky_kafka.Publisher"
        )
    if scheme == "stream-v2":
        raise StreamError(
            f"{url}: a stream-v2 URL is only a source; simulate a detector with "
            "spark-mpi stream produce --format stream-v2"
        )
    if scheme == "kafka":
        from sparkmpi.streaming.kafka_transport import KafkaSink

        return KafkaSink(f"{host}:{port}", topic, config=access.kafka_config if access else None)
    from sparkmpi.streaming.zmq_transport import ZmqSink

    return ZmqSink(host, port, curve=access.curve if access else None)
