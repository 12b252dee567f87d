"""A producer for the spark-mpi streaming pipeline written only from docs/streaming-records.md,
with no sparkmpi import: it streams a scan saved as .npz over Kafka or ZeroMQ.

    python tests/foreign_producer.py --scan SCAN.npz --to kafka://HOST:PORT/TOPIC --scan-id ID
    python tests/foreign_producer.py --scan SCAN.npz --to zmq://HOST:PORT --scan-id ID

The .npz holds ``intensities`` (frames, n, n) measured intensities with zero frequency at the
centre, ``positions`` (frames, 2) window corners in object pixels as (row, col) = (y, x),
``probe`` (n, n) complex, and ``energy_ev``, ``distance_m``, ``pixel_size_m``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

HEADER = "sparkmpi"  # the Kafka header that holds a record's JSON
PROGRESS_EVERY_S = 0.2
SCAN_ID_CHARS = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")


class Refused(Exception):
    """Input this producer will not send; the message is one line."""


def load_scan(path: str) -> dict:
    """The scan in ``path`` as the arrays and numbers the records need, checked for the
    mistakes the format page lists."""
    with np.load(path) as saved:
        missing = {"intensities", "positions", "probe", "energy_ev", "distance_m", "pixel_size_m"}
        missing -= set(saved.files)
        if missing:
            raise Refused(f"{path}: missing {', '.join(sorted(missing))}")
        frames = np.ascontiguousarray(saved["intensities"], dtype="<f4")  # little-endian
        positions = np.asarray(saved["positions"], dtype=np.float64)
        probe = np.ascontiguousarray(saved["probe"], dtype="<c8")  # complex64, little-endian
        geometry = {k: float(saved[k]) for k in ("energy_ev", "distance_m", "pixel_size_m")}
    if frames.ndim != 3 or frames.shape[1] != frames.shape[2] or len(frames) < 1:
        raise Refused(f"{path}: intensities must be (frames, n, n), not {frames.shape}")
    if positions.shape != (len(frames), 2) or not np.isfinite(positions).all():
        raise Refused(f"{path}: need one finite (row, col) position per frame")
    if np.ptp(positions, axis=0).max() < 1:
        raise Refused(f"{path}: positions span less than a pixel: metres, not object pixels?")
    if probe.shape != frames.shape[1:]:
        raise Refused(f"{path}: probe {probe.shape} does not match frames {frames.shape[1:]}")
    if not all(v > 0 for v in geometry.values()):
        raise Refused(f"{path}: energy_ev, distance_m and pixel_size_m must be positive")
    return {"frames": frames, "positions": positions, "probe": probe, "geometry": geometry}


def check_scan_id(scan_id: str) -> str:
    if not 1 <= len(scan_id) <= 128 or set(scan_id) - SCAN_ID_CHARS or scan_id in (".", ".."):
        raise Refused(f"scan id {scan_id!r} is not 1 to 128 of A-Z a-z 0-9 . _ -")
    return scan_id


def scan_start(scan_id: str, scan: dict) -> tuple[dict, bytes]:
    count, rows, cols = scan["frames"].shape
    header = {
        "type": "scan-start",
        "scan_id": scan_id,
        "frames": count,
        "shape": [rows, cols],
        "dtype": "float32",
        "positions": scan["positions"].tolist(),  # [row, col] object pixels, one per frame
        "geometry": scan["geometry"],
    }
    return header, scan["probe"].tobytes()  # complex64, C order


def frame(scan_id: str, index: int, pixels: np.ndarray) -> tuple[dict, bytes]:
    header = {
        "type": "frame",
        "scan_id": scan_id,
        "index": index,
        "t": time.time(),
        "shape": list(pixels.shape),
        "dtype": "float32",
    }
    return header, pixels.tobytes()  # float32 little-endian, C order


def paced(frames: np.ndarray, rate_hz: float):
    """(index, frame) at ``rate_hz`` frames per second (0: as fast as possible)."""
    start = time.monotonic()
    for index, pixels in enumerate(frames):
        if rate_hz > 0:
            delay = start + index / rate_hz - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        yield index, pixels


def send_kafka(bootstrap: str, topic: str, scan_id: str, scan: dict, rate_hz: float) -> int:
    """Streams the scan over Kafka; returns how many frames were delivered."""
    from confluent_kafka import KafkaError, KafkaException, Producer
    from confluent_kafka.admin import AdminClient, NewTopic

    control = f"{topic}.control"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    existing = admin.list_topics(timeout=10).topics
    wanted = {topic: 4, control: 1, f"{topic}.results": 1}
    new = [NewTopic(name, count, 1) for name, count in wanted.items() if name not in existing]
    for future in admin.create_topics(new).values() if new else []:
        try:
            future.result(10)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise  # "already exists": the driver was quicker
    partitions = len(admin.list_topics(topic, timeout=10).topics[topic].partitions)

    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 2})
    delivered: dict[int, int] = {}  # partition -> offset after the last delivered frame
    failed: list[str] = []

    def on_delivery(err, msg) -> None:
        if err is not None:
            failed.append(str(err))
            return
        p = msg.partition()
        delivered[p] = max(delivered.get(p, 0), msg.offset() + 1)

    def send_control(header: dict, payload: bytes = b"") -> None:
        headers = [(HEADER, json.dumps(header).encode())]
        producer.produce(control, value=payload, partition=0, headers=headers)

    def progress() -> None:
        offsets = {str(p): o for p, o in delivered.items()}
        send_control({"type": "progress", "scan_id": scan_id, "offsets": offsets})

    send_control(*scan_start(scan_id, scan))
    producer.flush(10)
    last_progress = time.monotonic()
    for index, pixels in paced(scan["frames"], rate_hz):
        header, payload = frame(scan_id, index, pixels)
        producer.produce(
            topic,
            value=payload,
            key=str(index).encode(),
            partition=index % partitions,
            headers=[(HEADER, json.dumps(header).encode())],
            on_delivery=on_delivery,
        )
        producer.poll(0)  # runs delivery callbacks
        if time.monotonic() - last_progress > PROGRESS_EVERY_S:
            progress()
            last_progress = time.monotonic()
    undelivered = producer.flush(30)  # every frame's delivery report is in after this
    progress()
    offsets = {str(p): o for p, o in delivered.items()}
    send_control({"type": "scan-end", "scan_id": scan_id, "t": time.time(), "offsets": offsets})
    if producer.flush(10) or undelivered or failed:
        reason = failed[0] if failed else f"{undelivered} messages still queued"
        print(f"{len(failed) + undelivered} frames not delivered ({reason})", file=sys.stderr)
    return len(scan["frames"]) - len(failed) - undelivered


def send_zmq(host: str, port: int, scan_id: str, scan: dict, rate_hz: float) -> int:
    """Streams the scan over ZeroMQ (PUSH, connecting to the driver's PULL); returns the
    frames sent."""
    import zmq

    context = zmq.Context()
    push = context.socket(zmq.PUSH)
    push.setsockopt(zmq.SNDHWM, 100_000)
    push.setsockopt(zmq.LINGER, 30_000)  # close() waits for a late driver
    push.connect(f"tcp://{host}:{port}")

    def send(header: dict, payload: bytes = b"") -> None:
        push.send_multipart([json.dumps(header).encode(), payload])

    try:
        send(*scan_start(scan_id, scan))
        for index, pixels in paced(scan["frames"], rate_hz):
            send(*frame(scan_id, index, pixels))
        send({"type": "scan-end", "scan_id": scan_id, "t": time.time(), "offsets": {}})
    finally:
        push.close()
        context.term()
    return len(scan["frames"])


def parse_url(url: str) -> tuple[str, str, int, str]:
    """(scheme, host, port, topic) of kafka://HOST:PORT/TOPIC or zmq://HOST:PORT."""
    scheme, _, rest = url.partition("://")
    address, _, topic = rest.partition("/")
    host, _, port = address.rpartition(":")
    if scheme not in ("kafka", "zmq") or not host or not port.isdigit():
        raise Refused(f"{url}: expected kafka://HOST:PORT/TOPIC or zmq://HOST:PORT")
    if scheme == "kafka" and not topic.strip("/"):
        raise Refused(f"{url}: a Kafka URL needs a topic")
    return scheme, host, int(port), topic.strip("/")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scan", required=True, help="scan .npz")
    parser.add_argument("--to", required=True, help="kafka://HOST:PORT/TOPIC or zmq://HOST:PORT")
    parser.add_argument("--scan-id", required=True)
    parser.add_argument("--rate", type=float, default=0.0, help="frames/s (0: as fast as it can)")
    args = parser.parse_args(argv)
    try:
        scheme, host, port, topic = parse_url(args.to)
        scan_id = check_scan_id(args.scan_id)
        scan = load_scan(args.scan)
    except Refused as exc:
        print(exc, file=sys.stderr)
        return 2
    if scheme == "kafka":
        sent = send_kafka(f"{host}:{port}", topic, scan_id, scan, args.rate)
    else:
        sent = send_zmq(host, port, scan_id, scan, args.rate)
    print(f"scan {scan_id}: {sent}/{len(scan['frames'])} frames sent to {args.to}")
    return 0 if sent == len(scan["frames"]) else 1


if __name__ == "__main__":
    sys.exit(main())
