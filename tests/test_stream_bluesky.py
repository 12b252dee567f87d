"""Bluesky runs (a real RunEngine, ophyd.sim motors and detectors, bluesky_kafka.Publisher)
reconstructed through ``bluesky+kafka://`` on a real Kafka-protocol broker (Tansu)."""

from __future__ import annotations

import os
import threading
import time

import h5py
import msgpack
import numpy as np
import pytest
from bluesky_kafka import Publisher

from helpers import Log
from sparkmpi.apps.ptycho.simulate import simulate
from sparkmpi.apps.ptycho.solver import phase_error
from sparkmpi.bench.stream_bluesky import run_bluesky_scan
from sparkmpi.streaming.access import StreamAccess
from sparkmpi.streaming.bluesky_docs import Translator, scan_id_of
from sparkmpi.streaming.bluesky_source import BlueskySource
from sparkmpi.streaming.driver import StreamDriver, StreamSettings
from sparkmpi.streaming.endpoints import open_sink, parse
from sparkmpi.streaming.kafka_transport import StreamError
from sparkmpi.streaming.protocol import MalformedRecord

SETTINGS = StreamSettings(batch_interval=0.5, iterations_per_batch=5, final_iterations=60)


@pytest.fixture(scope="module")
def scan():
    return simulate(48, 64)


def publisher(broker, topic: str) -> Publisher:
    def serialize(message) -> bytes:  # raw bytes pass as they are (a damaged message)
        return message if isinstance(message, bytes) else msgpack.dumps(message)

    return Publisher(
        topic,
        broker.bootstrap,
        key="beamline",
        producer_config={"acks": 1, "log_level": 0},
        flush_on_stop_doc=True,
        serializer=serialize,
    )


def reconstruct(spark, broker, topic, tmp_path, produce):
    """Runs ``produce()`` while a driver follows ``topic``; the final summary and the log."""
    log = Log()
    url = f"bluesky+kafka://{broker.bootstrap}/{topic}"
    access = StreamAccess(data_roots=(os.path.realpath(tmp_path),))  # --data-root
    with StreamDriver(spark, url, tmp_path / "out", SETTINGS, log=log, access=access) as driver:
        result = {}
        runner = threading.Thread(target=lambda: result.update(summary=driver.run_scan(120)))
        runner.start()
        try:
            produce()
        finally:
            runner.join(180)
    return result.get("summary"), log


def check_reconstruction(summary, log, scan) -> None:
    assert summary is not None, log
    assert summary["frames_used"] == 48 and summary["frames_lost"] == 0, log
    assert summary["frames_applied_twice"] == 0
    with h5py.File(summary["file"]) as f:
        obj, frames = f["object"][()], f["frames"][()]
        lit = f["illumination"][()] > 0.5 * f["illumination"][()].max()
    assert sorted(frames) == list(range(48))
    assert phase_error(obj, scan.truth_object, lit.astype(float), remove_ramp=True) < 0.1


def test_a_bluesky_run_with_inline_images_is_reconstructed(spark, broker, scan, tmp_path):
    pub = publisher(broker, "bluesky-inline")
    uid = {}
    summary, log = reconstruct(
        spark,
        broker,
        "bluesky-inline",
        tmp_path,
        lambda: uid.update(uid=run_bluesky_scan(scan, pub)),
    )
    check_reconstruction(summary, log, scan)
    assert summary["scan_id"] == scan_id_of(uid["uid"]) and summary["malformed"] == 0


class Saboteur:
    """Publishes a run's documents and, around them, wrong ones."""

    def __init__(self, pub: Publisher):
        self.pub = pub
        self.resource = None

    def __call__(self, name: str, doc: dict) -> None:
        if name == "start":
            self.pub("event", {"descriptor": "d-before-start", "seq_num": 1, "data": {}})
        if name == "resource":
            self.resource = doc["uid"]
        if name == "event" and doc["seq_num"] == 4:
            off = {**doc, "data": {**doc["data"], "sy": doc["data"]["sy"] + 0.05}}
            self.pub("event", off)  # 5 pixels from its planned position
            self.pub("datum", {"resource": "no-such-resource", "datum_id": "x/0"})
            self.pub("event", {**doc, "data": {**doc["data"], "img": "x/0"}})
            missing = f"{self.resource}/999"
            kwargs = {"index": 999}
            self.pub(
                "datum", {"resource": self.resource, "datum_id": missing, "datum_kwargs": kwargs}
            )
            self.pub("event", {**doc, "data": {**doc["data"], "img": missing}})
            self.pub.produce(msgpack.dumps(("event", doc))[:-7])  # truncated
            self.pub("event", {**doc, "descriptor": "no-such-descriptor"})
        self.pub(name, doc)


def test_npy_files_and_wrong_documents_are_skipped_with_a_reason(spark, broker, scan, tmp_path):
    saboteur = Saboteur(publisher(broker, "bluesky-files"))
    files = tmp_path / "files"
    files.mkdir()
    summary, log = reconstruct(
        spark,
        broker,
        "bluesky-files",
        tmp_path,
        lambda: run_bluesky_scan(scan, saboteur, files=files),
    )
    check_reconstruction(summary, log, scan)
    assert summary["malformed"] == 3 and summary["dropped_duplicates"] == 0
    text = "\n".join(log)
    assert "event of unknown descriptor d-before-sta" in text
    assert "event of unknown descriptor no-such-desc" in text
    assert "datum 'x/0' of unknown resource" in text
    assert "frame 3: sy readback 0.42 is 5 pixels from its planned 0.37" in text
    assert "frame 3: datum 'x/0' unknown" in text
    assert "frame 3: cannot read NPY_SEQ data" in text and "_999.npy" in text
    assert "not MessagePack" in text


def test_a_driver_stopped_mid_run_is_resumed_by_the_next(spark, broker, scan, tmp_path):
    topic, docs = "bluesky-resume", []
    run_bluesky_scan(scan, lambda name, doc: docs.append((name, doc)))  # the run, before publishing
    first_half = next(i for i, (name, doc) in enumerate(docs) if doc.get("seq_num") == 25)
    url, out, log = f"bluesky+kafka://{broker.bootstrap}/{topic}", tmp_path / "out", Log()
    pub = publisher(broker, topic)
    with StreamDriver(spark, url, out, SETTINGS, log=log) as first:
        result = {}
        runner = threading.Thread(target=lambda: result.update(summary=first.run_scan(120)))
        runner.start()
        for name, doc in docs[:first_half]:
            pub(name, doc)
        pub.flush()
        deadline = time.monotonic() + 120
        while not any(line.startswith("batch 1:") for line in log):
            assert time.monotonic() < deadline and runner.is_alive(), log
            time.sleep(0.1)
        first.stop()
        runner.join(120)
    assert result == {"summary": None}, log
    for name, doc in docs[first_half:]:
        pub(name, doc)
    log2 = Log()
    with StreamDriver(spark, url, out, SETTINGS, log=log2) as second:
        summary = second.run_scan(120)
    assert any("resuming after batch" in line for line in log2), log2
    check_reconstruction(summary, log + log2, scan)
    assert summary["dropped_duplicates"] == 0 and summary["malformed"] == 0


def test_a_restarted_source_resumes_inside_a_run_and_skips_finished_ones(broker, scan, tmp_path):
    topic = "bluesky-restart"
    first = BlueskySource(broker.bootstrap, topic, log=Log())
    pub = publisher(broker, topic)
    uid = run_bluesky_scan(scan, pub)
    started = first.wait_for_scan(60)
    assert started.scan_id == scan_id_of(uid) and started.frames == 48
    deadline = time.monotonic() + 60
    while not (len(items := first.poll(0.2)) == 48 and first.ended):
        assert time.monotonic() < deadline
    first.advance({}, items[:20])  # as the driver does once a batch is durable
    position = first.position()
    first.close()  # a driver dies: nothing was committed
    second = BlueskySource(broker.bootstrap, topic, log=Log())
    second.resume(started)
    second.seek(position)
    deadline = time.monotonic() + 60
    while not ((rest := second.poll(0.2)) and second.ended):
        assert time.monotonic() < deadline
    assert sorted(index for _, _, index, _ in rest) == list(range(20, 48))
    second.advance({}, rest)
    second.finished(started.scan_id)
    second.close()
    later = run_bluesky_scan(scan, pub)
    third = BlueskySource(broker.bootstrap, topic, log=Log())
    try:
        assert third.wait_for_scan(60).scan_id == scan_id_of(later)
    finally:
        third.close()


def test_urls_and_start_documents_are_checked():
    assert parse("bluesky+kafka://h:9092/docs") == ("bluesky+kafka", "h", 9092, "docs")
    with pytest.raises(StreamError, match="needs a topic"):
        parse("bluesky+kafka://h:9092")
    with pytest.raises(StreamError, match="only a source"):
        open_sink("bluesky+kafka://h:9092/docs")
    log = Log()
    docs = Translator(log=log)
    docs.feed(0, 0, "start", {"uid": "u1", "num_points": 2, "sparkmpi": {"position_fields": []}})
    docs.feed(0, 1, "start", {"uid": "u2", "num_points": 2})
    docs.feed(0, 2, "stop", {"run_start": "u3"})
    docs.feed(0, 3, "event", [1, 2])
    assert not docs.runs
    assert "position_fields must name two fields" in log[0]
    assert "has no sparkmpi metadata" in log[1]
    assert "stop of unknown run u3" in log[2]
    assert "not a map" in log[3]


def test_pages_and_area_detector_hdf5_files(tmp_path):
    images = np.arange(3 * 4 * 4, dtype=np.uint16).reshape(3, 4, 4)
    with h5py.File(tmp_path / "scan.h5", "w") as f:
        f["entry/data/data"] = images
    probe = np.ones((4, 4, 2)).tolist()
    geometry = {"energy_ev": 8000.0, "distance_m": 1.0, "pixel_size_m": 5e-5}
    md = {"position_fields": ["y", "x"], "units_per_pixel": [0.5, 0.5], "probe": probe}
    md.update(geometry=geometry, positions=[[0, 0], [0, 1], [1, 0]])
    log = Log()
    docs = Translator(log=log, data_roots=(os.path.realpath(tmp_path),))
    docs.feed(0, 0, "start", {"uid": "run-0", "num_points": 3, "sparkmpi": md})
    docs.feed(0, 0, "stop", {"run_start": "run-0"})  # aborted before its first event
    assert log == [
        "skipped a bluesky stop document: run run-0 stopped before its primary descriptor"
    ]
    docs.feed(0, 0, "start", {"uid": "run-1", "num_points": 3, "sparkmpi": md})
    keys = {"det": {"shape": [1, 4, 4]}, "y": {"shape": []}, "x": {"shape": []}}
    docs.feed(0, 1, "descriptor", {"uid": "d1", "run_start": "run-1", "data_keys": keys})
    resource = {"uid": "r1", "run_start": "run-1", "spec": "AD_HDF5", "root": str(tmp_path)}
    docs.feed(0, 2, "resource", {**resource, "resource_path": "scan.h5"})
    ids = ["r1/0", "r1/1", "r1/2"]
    page = {"resource": "r1", "datum_id": ids, "datum_kwargs": {"point_number": [0, 1, 2]}}
    docs.feed(0, 3, "datum_page", page)
    data = {"det": ids, "y": [0.0, 0.0, 1.0], "x": [0.0, 1.0, 0.0]}
    event_page = {"descriptor": "d1", "seq_num": [1, 2, 3], "time": [1.0, 2.0, 3.0]}
    docs.feed(0, 4, "event_page", {**event_page, "data": data})
    docs.feed(0, 5, "stop", {"run_start": "run-1"})
    run = docs.runs[scan_id_of("run-1")]
    assert run.ended and run.scan.shape == (4, 4) and run.scan.params["positions"][2] == [2, 0]
    frames = [f for _, _, _, item in run.pending for f in item.frames(run.scan)]
    assert [f.index for f in frames] == [0, 1, 2]
    assert all((f.data == images[f.index]).all() for f in frames)


@pytest.mark.parametrize(
    ("roots", "root", "why"),
    [
        ((), "{tmp}", "no --data-root allows files"),
        (("{tmp}/allowed",), "{tmp}", "is not inside a --data-root"),
        (("{tmp}/allowed",), "{tmp}/allowed/..", "is not inside a --data-root"),
    ],
)
def test_files_named_by_documents_must_lie_under_a_data_root(tmp_path, roots, root, why):
    (tmp_path / "allowed").mkdir()
    with h5py.File(tmp_path / "scan.h5", "w") as f:
        f["entry/data/data"] = np.zeros((1, 4, 4), np.uint16)
    md = {
        "position_fields": ["y", "x"],
        "units_per_pixel": 1.0,
        "probe": np.ones((4, 4, 2)).tolist(),
    }
    md.update(geometry={"energy_ev": 8e3, "distance_m": 1.0, "pixel_size_m": 5e-5})
    md.update(positions=[[0, 0]])
    allowed = tuple(os.path.realpath(r.format(tmp=tmp_path)) for r in roots)
    docs = Translator(log=Log(), data_roots=allowed)
    docs.feed(0, 0, "start", {"uid": "run-1", "num_points": 1, "sparkmpi": md})
    keys = {"det": {"shape": [1, 4, 4]}, "y": {"shape": []}, "x": {"shape": []}}
    docs.feed(0, 1, "descriptor", {"uid": "d1", "run_start": "run-1", "data_keys": keys})
    resource = {"uid": "r1", "run_start": "run-1", "spec": "AD_HDF5"}
    docs.feed(
        0,
        2,
        "resource",
        {**resource, "root": root.format(tmp=tmp_path), "resource_path": "scan.h5"},
    )
    docs.feed(
        0, 3, "datum", {"resource": "r1", "datum_id": "r1/0", "datum_kwargs": {"point_number": 0}}
    )
    event = {
        "descriptor": "d1",
        "seq_num": 1,
        "time": 1.0,
        "data": {"det": "r1/0", "y": 0.0, "x": 0.0},
    }
    docs.feed(0, 4, "event", event)
    run = docs.runs[scan_id_of("run-1")]
    ((_, _, _, item),) = run.pending
    with pytest.raises(MalformedRecord, match=why):
        item.frames(run.scan)
