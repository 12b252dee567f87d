"""DECTRIS Stream V2: CBOR decoding of the simulator's messages, malformed messages reported
and skipped, and a simulated detector streamed through the pipeline."""

from __future__ import annotations

import re
import threading
import time

import cbor2
import h5py
import numpy as np
import pytest
import zmq

from helpers import Log
from sparkmpi.apps.ptycho.simulate import simulate
from sparkmpi.apps.ptycho.solver import phase_error
from sparkmpi.apps.ptycho.streaming import stream_v2_series
from sparkmpi.deploy.ports import free_port
from sparkmpi.streaming.driver import StreamDriver, StreamSettings
from sparkmpi.streaming.endpoints import check, open_sink, parse
from sparkmpi.streaming.kafka_transport import StreamError
from sparkmpi.streaming.protocol import MalformedRecord
from sparkmpi.streaming.stream_v2 import StreamV2Image, StreamV2Source, start_record
from sparkmpi.streaming.stream_v2_cbor import loads
from sparkmpi.streaming.stream_v2_sim import CHANNEL, counts, messages, produce_stream_v2


def series_messages(scan, *args, **kwargs):
    """The Stream V2 messages of a ptychography scan, as the simulator sends them."""
    start, frames, detector = stream_v2_series(scan)
    return messages(start, frames, *args, detector=detector, **kwargs)


def wait_for(condition, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached in {timeout} s: {what}")
        time.sleep(0.02)


@pytest.fixture(scope="module")
def small():
    return simulate(6, 32, photons=1e6)


def edit(raw: bytes, **changes) -> bytes:
    """``raw`` re-encoded with top-level fields changed (None: removed)."""
    message = dict(cbor2.loads(raw))
    for key, value in changes.items():
        if value is None:
            message.pop(key, None)
        else:
            message[key] = value
    return cbor2.dumps(message)


def frame_of(raw: bytes, scan, index: int):
    return StreamV2Image(scan.scan_id, index, raw, 0.0).frames(scan)[0]


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
@pytest.mark.parametrize("compression", ["bslz4", "lz4", None])
def test_simulator_messages_decode_to_the_counts(small, dtype, compression):
    sent = list(series_messages(small, 7, dtype, compression, unique_id="abc/1"))
    assert all(m[:3] == b"\xd9\xd9\xf7" for m in sent)  # self-described CBOR
    start = start_record(loads(sent[0]))
    assert start.scan_id == "series-7-abc_1" and start.frames == 6
    assert start.shape == (32, 32) and start.dtype == dtype
    assert np.allclose(start.params["positions"], small.positions)
    assert start.params["geometry"]["energy_ev"] == small.energy_ev
    probe = np.frombuffer(start.data, np.complex64).reshape(32, 32)
    assert np.array_equal(probe, small.probe.astype(np.complex64))
    for index, raw in enumerate(sent[1:-1]):
        frame = frame_of(raw, start, index)
        assert frame.data.dtype == np.dtype(dtype) and frame.index == index
        assert np.array_equal(frame.data, counts(small.intensities[index], dtype))
    assert loads(sent[-1])["type"] == "end"


def test_compression_tag_follows_the_specification(small):
    raw = list(series_messages(small, 1, "uint16", "bslz4"))[1]
    array = cbor2.loads(raw)["data"][CHANNEL]
    assert array.tag == 40 and list(array.value[0]) == [32, 32]
    typed = array.value[1]
    assert typed.tag == 69  # uint16 little-endian
    algorithm, elem_size, _ = typed.value.value
    assert typed.value.tag == 56500 and (algorithm, elem_size) == ("bslz4", 2)
    lz4 = cbor2.loads(list(series_messages(small, 1, "uint32", "lz4"))[1])["data"][CHANNEL]
    assert lz4.value[1].tag == 70 and list(lz4.value[1].value.value[:2]) == ["lz4", 0]


def test_bad_image_messages_name_the_field(small):
    sent = list(series_messages(small, 3, "uint16", "bslz4"))
    start = start_record(loads(sent[0]))
    image = sent[2]
    data = cbor2.loads(image)["data"][CHANNEL]
    algorithm, elem_size, packed = data.value[1].value.value
    corrupt = packed[:12] + bytes(len(packed) - 12)
    bad_bytes = cbor2.CBORTag(
        40, [[32, 32], cbor2.CBORTag(69, cbor2.CBORTag(56500, [algorithm, elem_size, corrupt]))]
    )
    wide = cbor2.CBORTag(40, [[32, 32], cbor2.CBORTag(70, bytes(32 * 32 * 4))])
    small_shape = cbor2.CBORTag(40, [[16, 64], cbor2.CBORTag(69, bytes(32 * 32 * 2))])
    cases = {
        b"not cbor \xff\xff": "image 1",
        cbor2.dumps([1, 2]): "not a Stream V2 message",
        image[: len(image) // 2]: "truncated",
        edit(image, type="end"): "not 'image'",
        edit(image, series_id=4): "series_id 4",
        edit(image, series_unique_id="other"): "series_unique_id 'other'",
        edit(image, image_id=2): "image_id 2",
        edit(image, data={"other": wide}): "no array for channel 'threshold_1'",
        edit(image, data={CHANNEL: wide}): "dtype uint32",
        edit(image, data={CHANNEL: small_shape}): "shape (16, 64)",
        edit(image, data={CHANNEL: bad_bytes}): "does not decompress",
    }
    for raw, reason in cases.items():
        with pytest.raises(MalformedRecord, match=re.escape(reason)):
            frame_of(raw, start, 1)
    with pytest.raises(MalformedRecord, match=re.escape("outside 0..5")):
        StreamV2Image(start.scan_id, 6, edit(image, image_id=6), 0.0).frames(start)


def test_bad_start_messages_name_the_field(small):
    start = next(series_messages(small, 3, "uint16", None))
    user = {"sparkmpi": {"params": {"positions": b"raw"}}}
    cases = {
        edit(start, number_of_images=0): "number_of_images 0",
        edit(start, image_size_x=None): "image_size_x is None",
        edit(start, channels=[]): "channels is []",
        edit(start, user_data=user): "params is not JSON",
        edit(start, user_data={"sparkmpi": {"payload": 3}}): "payload is no bytes",
    }
    for raw, reason in cases.items():
        with pytest.raises(MalformedRecord, match=re.escape(reason)):
            start_record(loads(raw))
    with pytest.raises(MalformedRecord, match="channel 'other'"):
        start_record(loads(start), channel="other")


class Detector:
    """A PUSH socket bound as a detector's, and a source connected to it."""

    def __init__(self):
        self.port = free_port()
        self.context = zmq.Context()
        self.push = self.context.socket(zmq.PUSH)
        self.push.bind(f"tcp://127.0.0.1:{self.port}")
        self.log = Log()
        self.source = StreamV2Source("127.0.0.1", self.port, log=self.log)

    def send(self, *raws: bytes) -> None:
        for raw in raws:
            self.push.send(raw)

    def close(self) -> None:
        self.source.close()
        self.push.close(linger=0)
        self.context.term()


@pytest.fixture
def detector():
    running = Detector()
    yield running
    running.close()


def test_source_reports_and_skips_bad_messages(detector, small):
    sent = list(series_messages(small, 5, "uint16", "lz4", unique_id="u5"))
    start, images, end = sent[0], sent[1:-1], sent[-1]
    detector.send(
        b"\xff not cbor",
        cbor2.dumps({"kind": "start"}),
        images[0],  # before its start
        start,
        start,  # a second start of the same series
        edit(images[1], image_id=6),
        images[2][:-40],
        edit(start, image_dtype="float64", series_id=6),
        cbor2.dumps({"type": "status"}),
        *images,
        end,
        images[3],  # after its end
    )
    source = detector.source
    wait_for(lambda: source.rejected == 9, "nine rejected messages")
    text = "\n".join(detector.log)
    for reason in (
        "not CBOR",
        "not a Stream V2 message",
        "image message of series 5, which has no start",
        "a second start of series-5-u5",
        "image_id 6 outside 0..5",
        "truncated",
        "image_dtype 'float64'",
        "unknown message type 'status'",
        "image message of series-5-u5, which has ended",
    ):
        assert reason in text, (reason, detector.log)
    scan = source.wait_for_scan(timeout=10)
    assert scan is not None and scan.scan_id == "series-5-u5"
    assert source.ended and not source.complete()
    items = source.poll()
    assert sorted(item.index for item in items) == list(range(6))
    work = source.route(items, 4)
    assert [sorted(i.index for i in w) for w in work] == [[0, 4], [1, 5], [2], [3]]
    for item in items:
        assert np.array_equal(
            item.frames(scan)[0].data, counts(small.intensities[item.index], "uint16")
        )
    source.advance({}, items)
    assert source.complete()


def test_a_new_series_closes_the_one_without_an_end(detector, small):
    first = list(series_messages(small, 1, "uint32", None, unique_id="a"))
    second = list(series_messages(small, 2, "uint32", None, unique_id="b"))
    detector.send(first[0], first[1], second[0], first[2], second[1], second[-1])
    source = detector.source
    wait_for(lambda: source.rejected == 1, "the late image of series 1 rejected")
    assert "series-2-b started before series-1-a ended" in "\n".join(detector.log)
    scan = source.wait_for_scan(timeout=10, skip={"nothing"})
    assert scan.scan_id == "series-1-a" and source.ended
    assert [item.index for item in source.poll()] == [0]
    source.finished(scan.scan_id)
    assert source.complete()
    scan = source.wait_for_scan(timeout=10)
    assert scan.scan_id == "series-2-b"
    wait_for(lambda: source.ended, "the end of series 2")
    assert [item.index for item in source.poll()] == [0]


def test_stream_v2_urls():
    assert parse("stream-v2://dcu:31001") == ("stream-v2", "dcu", 31001, "")
    for wrong in ("?clients=all", "?clients=ranks&clients=driver", "?rate=5"):
        with pytest.raises(StreamError, match=r"\?clients=driver or \?clients=ranks"):
            check("stream-v2://dcu:31001" + wrong)
    with pytest.raises(StreamError, match="only a source"):
        open_sink("stream-v2://127.0.0.1:31001")


@pytest.mark.parametrize("clients", ["driver", "ranks"])
def test_a_simulated_detector_streams_a_scan_through_the_pipeline(spark, tmp_path, clients):
    scan = simulate(48, 64, photons=1e6)
    url = f"stream-v2://127.0.0.1:{free_port()}?clients={clients}"
    settings = StreamSettings(batch_interval=0.5, iterations_per_batch=5, final_iterations=60)
    log, sent = Log(), {}
    with StreamDriver(spark, url, tmp_path / "out", settings, log=log) as driver:

        def send() -> None:
            sent.update(
                produce_stream_v2(*stream_v2_series(scan)[:2], url, rate_hz=200, series_id=12)
            )

        detector = threading.Thread(target=send)
        detector.start()
        try:
            summary = driver.run_scan(timeout=60)
        finally:
            detector.join(60)
        assert driver.source.rejected == 0  # with clients=ranks, no image reached the driver
    assert sent["scan_id"] == summary["scan_id"] and sent["frames"] == 48
    assert summary["frames_used"] == 48 and summary["frames_lost"] == 0, log
    assert summary["malformed"] == 0 and summary["frames_applied_twice"] == 0
    with h5py.File(summary["file"]) as f:
        streamed, frames = f["object"][()], f["frames"][()]
        lit = f["illumination"][()] > 0.5 * f["illumination"][()].max()
    assert sorted(frames) == list(range(48))
    error = phase_error(streamed, scan.truth_object, lit.astype(float), remove_ramp=True)
    print(f"phase error {error:.4f}")
    assert error < 0.1


def test_ranks_reading_the_detector_skip_bad_messages_and_finish_the_scan(spark, small, tmp_path):
    sent = list(series_messages(small, 8, "uint16", "bslz4", unique_id="r8"))
    start, images, end = sent[0], sent[1:-1], sent[-1]
    bad = [b"\xff not cbor", images[2][:-40], edit(images[1], image_id=6)]
    port = free_port()
    context = zmq.Context()
    push = context.socket(zmq.PUSH)
    push.bind(f"tcp://127.0.0.1:{port}")
    url = f"stream-v2://127.0.0.1:{port}?clients=ranks"
    settings = StreamSettings(batch_interval=0.3, iterations_per_batch=2, final_iterations=5)
    log = Log()
    try:
        with StreamDriver(spark, url, tmp_path / "out", settings, log=log) as driver:
            driver.start_session()  # every rank has connected its socket when this returns
            for message in [start, *bad, *images, end]:
                push.send(message)
            summary = driver.run_scan(timeout=60)
            assert driver.source.rejected == 0  # nothing came to the driver but start and end
    finally:
        push.close(linger=0)
        context.term()
    assert summary["scan_id"] == "series-8-r8" and summary["frames_used"] == 6, log
    assert summary["frames_applied_twice"] == 0
    # a message the ranks drop before the start is relayed counts for no scan, but is logged
    assert summary["malformed"] >= 1  # the bad image id is found when its scan decodes it
    skipped = [line for line in log if "skipped a malformed record" in line]
    assert len(skipped) == 3, log
    for reason in ("not CBOR", "truncated", "image_id 6 outside 0..5"):
        assert reason in "\n".join(skipped), (reason, log)


def test_relayed_messages_from_several_ranks_have_no_order(small):
    first = list(series_messages(small, 3, "uint16", None, unique_id="o"))
    other = list(series_messages(small, 4, "uint16", None, unique_id="p"))
    log = Log()
    source = StreamV2Source("127.0.0.1", free_port(), log=log, on_ranks=True)
    source.relay([first[-1], first[0]])  # rank 0 had the end, rank 1 the start
    scan = source.wait_for_scan(timeout=1)
    assert scan is not None and scan.scan_id == "series-3-o" and source.rejected == 0
    source.note_batch(len(first) - 2, len(first) - 2)
    assert source.complete()
    source.relay([other[-1]])  # an end whose start is still on its way
    source.relay([])
    source.relay([other[0]])
    assert source.rejected == 0 and source.wait_for_scan(timeout=1).scan_id == "series-4-p"
    source.relay([edit(other[-1], series_id=9)])  # an end of a series that never starts
    for _ in range(3):
        source.relay([])
    assert source.rejected == 1 and "series 9, which has no start" in "\n".join(log)
    source.close()
