"""``bench stream-v2``: how fast DECTRIS Stream V2 images get into the ranks, decoded.

A simulated detector PUSHes ``--frames`` images of ``--size``² uint16 counts, bslz4-compressed
as an EIGER does, as fast as it can. ``raw``: one plain pyzmq PULL socket receives and fully
decodes them (CBOR, decompression) in one thread, the most one process does. ``pipeline``: the
:class:`~sparkmpi.streaming.stream_v2.StreamV2Source` takes them and every batch interval ships
them to ``--ranks`` MPI ranks of a persistent session, which decode them (no solver). Rate:
images / (first image received .. last one decoded), one batch interval of waiting included;
"busy": images / seconds spent shipping and decoding batches, the rate the pipeline sustains.
"""

from __future__ import annotations

import argparse
import threading
import time
from functools import partial

import numpy as np

from sparkmpi.bench.report import bar_plot, print_table, write_json

DISTINCT = 8  # distinct images, compressed once and repeated


def make_messages(frames: int, size: int, seed: int = 0) -> list[bytes]:
    """start, ``frames`` images (diffraction-like Poisson counts, bslz4), end; encoded."""
    import cbor2

    from sparkmpi.streaming.stream_v2_sim import CHANNEL, MAGIC, Compressor, image_array

    rng = np.random.default_rng(seed)
    y, x = np.indices((size, size)) - size / 2
    mean = 2e4 / (1 + (x**2 + y**2) / 16.0) ** 1.5
    compress = Compressor((size, size), "uint16", "bslz4")
    arrays = [
        image_array(np.minimum(rng.poisson(mean), 65534).astype("<u2"), compress)
        for _ in range(DISTINCT)
    ]
    compress.close()
    ident = {"series_id": 1, "series_unique_id": f"bench-{seed}"}
    start = {
        "type": "start",
        **ident,
        "channels": [CHANNEL],
        "image_dtype": "uint16",
        "image_size_x": size,
        "image_size_y": size,
        "number_of_images": frames,
    }
    images = [
        {"type": "image", **ident, "image_id": i, "data": {CHANNEL: arrays[i % DISTINCT]}}
        for i in range(frames)
    ]
    end = {"type": "end", **ident}
    return [cbor2.dumps(cbor2.CBORTag(MAGIC, m)) for m in [start, *images, end]]


def _push(port: int, messages: list[bytes], ready: threading.Event):
    """A bound PUSH socket that sends ``messages`` once a client connects (a thread)."""
    import zmq

    context = zmq.Context()
    socket = context.socket(zmq.PUSH)
    socket.setsockopt(zmq.SNDHWM, len(messages) + 10)
    socket.bind(f"tcp://127.0.0.1:{port}")

    def send() -> None:
        try:
            ready.wait()
            socket.poll(60_000, zmq.POLLOUT)
            for message in messages:
                socket.send(message, copy=False)
        finally:
            socket.close(linger=60_000)
            context.term()

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


def raw_rate(messages: list[bytes], port: int) -> float:
    """Images per second one PULL socket receives and decodes."""
    import zmq

    from sparkmpi.streaming.stream_v2_cbor import loads

    context = zmq.Context()
    pull = context.socket(zmq.PULL)
    pull.setsockopt(zmq.RCVTIMEO, 60_000)
    pull.connect(f"tcp://127.0.0.1:{port}")
    ready = threading.Event()
    sender = _push(port, messages, ready)
    ready.set()
    images, first = 0, None
    limit = 1 << 30
    while True:
        message = loads(pull.recv(), limit)
        if message["type"] == "image":
            first = first or time.perf_counter()
            images += int(np.asarray(message["data"]["threshold_1"]).size > 0)
        elif message["type"] == "end":
            break
    elapsed = time.perf_counter() - first
    sender.join(60)
    pull.close(linger=0)
    context.term()
    return images / elapsed


def _decode(scan, comm, items) -> dict:
    """Decodes ``items`` and, when the ranks read the detector, the images this rank holds."""
    from sparkmpi.streaming.protocol import MalformedRecord
    from sparkmpi.streaming.stream_v2_ranks import take_control, take_images

    local = take_images(scan.scan_id) if scan is not None else []
    items = [*(items or []), *local]
    frames, malformed, begin = 0, 0, time.perf_counter()
    for item in items:
        try:
            frames += len(item.frames(scan))
        except MalformedRecord:
            malformed += 1
    decoding = time.perf_counter() - begin
    return {
        "frames": frames,
        "malformed": malformed,
        "done": time.time(),
        "decoding": decoding,
        "first": min((item.received for item in items), default=None),
        "control": take_control()[0],
    }


def pipeline_rate(
    spark, messages: list[bytes], port: int, ranks: int, interval: float, on_ranks: bool
) -> dict:
    """Images per second ``ranks`` decoding ranks take in, read by the driver's source and
    shipped to them, or (``on_ranks``) read by each rank's own PULL socket; batches, lost."""
    from sparkmpi.runner import MPISession
    from sparkmpi.streaming.stream_v2 import StreamV2Source
    from sparkmpi.streaming.stream_v2_ranks import open_receiver

    source = StreamV2Source("127.0.0.1", port, log=print, on_ranks=on_ranks)
    ready = threading.Event()
    sender = _push(port, messages, ready)
    frames = len(messages) - 2
    decoded = malformed = batches = 0
    busy = decoding = 0.0
    firsts: list[float] = []
    with MPISession(spark, ranks) as session:
        if on_ranks:
            session.run(partial(open_receiver, source.rank_input))
        session.run(partial(_decode, None), data=[[] for _ in range(ranks)])  # warm
        ready.set()
        scan, done, deadline = None, 0.0, time.monotonic() + 600
        while scan is None and time.monotonic() < deadline:
            if on_ranks:
                source.relay([m for r in session.run(partial(_decode, None)) for m in r["control"]])
            scan = source.wait_for_scan(timeout=interval)
        if scan is None:
            raise RuntimeError("no start message arrived")
        while decoded < frames and not source.complete() and time.monotonic() < deadline:
            time.sleep(interval)
            items = source.poll()
            if not (items or on_ranks):
                continue
            begin = time.perf_counter()
            results = session.run(partial(_decode, scan), data=source.route(items, ranks))
            busy += time.perf_counter() - begin
            decoding += max(r["decoding"] for r in results)
            source.advance({}, items)
            new = sum(r["frames"] for r in results)
            if on_ranks:
                source.relay([m for r in results for m in r["control"]])
                source.note_batch(new, decoded + new)
            if not new:
                continue
            firsts += [r["first"] for r in results if r["first"] is not None]
            decoded += sum(r["frames"] for r in results)
            malformed += sum(r["malformed"] for r in results)
            done, batches = max(r["done"] for r in results), batches + 1
    sender.join(60)
    source.close()
    return {
        "rate": decoded / (done - min(firsts)),
        "decoded": decoded,
        "lost": frames - decoded,
        "malformed": malformed,
        "batches": batches,
        "busy_s": busy,
        "decoding_s": decoding,
    }


def main(args: argparse.Namespace) -> int:
    from sparkmpi.deploy.ports import free_port
    from sparkmpi.runner.context import spark_session

    messages = make_messages(args.frames, args.size)
    compressed = np.mean([len(m) for m in messages[1:-1]])
    raw = raw_rate(messages, free_port())
    spark = spark_session(args.master, cores=args.ranks, app_name="spark-mpi bench stream-v2")
    runs = {
        clients: pipeline_rate(
            spark, messages, free_port(), args.ranks, args.batch_interval, clients == "ranks"
        )
        for clients in ("driver", "ranks")
    }
    names = {
        "driver": f"driver's PULL socket -> {args.ranks} ranks",
        "ranks": f"{args.ranks} ranks' PULL sockets (?clients=ranks)",
    }
    rows = [["raw: one PULL socket, one thread", raw, "100%", "-", "-", 0, 0]]
    for clients, run in runs.items():
        run["of_raw"] = run["rate"] / raw
        run["busy_images_per_s"] = run["decoded"] / run["busy_s"]
        rows.append(
            [
                names[clients],
                run["rate"],
                f"{run['of_raw']:.0%}",
                run["busy_images_per_s"],
                run["batches"],
                run["lost"],
                run["malformed"],
            ]
        )
    print_table(
        f"Stream V2 ingest: {args.frames} images of {args.size}² uint16, bslz4 "
        f"({compressed / 1024:.0f} KiB each), decoded",
        ["run", "images/s", "of raw", "busy images/s", "batches", "lost", "malformed"],
        rows,
    )
    write_json(
        args.json,
        {
            "benchmark": "stream-v2 ingest",
            "frames": args.frames,
            "size": args.size,
            "ranks": args.ranks,
            "batch_interval_s": args.batch_interval,
            "compressed_bytes_mean": float(compressed),
            "raw_images_per_s": raw,
            "pipeline": runs["driver"],
            "pipeline_ranks": runs["ranks"],
        },
    )
    bar_plot(
        args.plot,
        "Stream V2 ingest: seconds per image",
        ["raw PULL + decode", *(names[c] for c in runs)],
        [1 / raw, *(1 / run["rate"] for run in runs.values())],
    )
    piped = {
        "lost": sum(r["lost"] for r in runs.values()),
        "malformed": sum(r["malformed"] for r in runs.values()),
    }
    return 0 if piped["lost"] == 0 and piped["malformed"] == 0 else 1
