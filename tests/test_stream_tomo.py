"""Streaming tomography: projections in golden-angle order through ZeroMQ; the live volume
after the last projection equals the batch FBP of the whole scan."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from helpers import spark_mpi
from sparkmpi.apps.tomo.algorithms import fbp
from sparkmpi.apps.tomo.dxchange import line_integrals
from sparkmpi.apps.tomo.phantom import blobs_phantom, simulate_tilt_series
from sparkmpi.apps.tomo.streaming import TomoStream, golden_order, scan_to_stream, start_record
from sparkmpi.deploy.ports import free_port
from sparkmpi.streaming.driver import StreamDriver, StreamSettings
from sparkmpi.streaming.endpoints import open_sink
from sparkmpi.streaming.protocol import Frame, MalformedRecord, ScanEnd
from sparkmpi.streaming.stream_v2_sim import produce_stream_v2
from sparkmpi.viz.data import load
from sparkmpi.viz.follow import Follower

TOOTH = Path(__file__).resolve().parents[2] / "shared" / "data" / "tooth.h5"


def test_golden_order_is_a_permutation_spreading_the_angles():
    order = golden_order(90)
    assert sorted(order) == list(range(90))
    assert abs(order[1] - order[0]) > 20  # the next angle is far from the last


def test_a_tomography_scan_start_is_checked():
    good = start_record(np.linspace(0, 180, 4, endpoint=False), (8, 16), "t")
    TomoStream.check_start(good)
    bad = start_record([0.0, 1.0], (8, 16), "t")
    bad.frames = 4
    with pytest.raises(MalformedRecord, match="angles_deg must be 4 finite numbers"):
        TomoStream.check_start(bad)
    huge = start_record([0.0], (4096, 8192), "t")
    with pytest.raises(MalformedRecord, match="volume is over"):
        TomoStream.check_start(huge)
    counts = start_record([0.0], (8, 16), "t", white=1000.0, dtype="uint16")
    TomoStream.check_start(counts)
    floats = start_record([0.0], (8, 16), "t", white=1000.0, dtype="float32")
    with pytest.raises(MalformedRecord, match="counts are integers"):
        TomoStream.check_start(floats)
    counts.data = counts.data[:-4]
    with pytest.raises(MalformedRecord, match="white and dark images"):
        TomoStream.check_start(counts)


def test_streamed_volume_equals_the_batch_fbp(spark, tmp_path):
    n, count = 24, 60
    volume = blobs_phantom((8, n, n), n_blobs=6)
    angles = np.linspace(0, 180, count, endpoint=False)
    projections = simulate_tilt_series(volume, angles)  # (count, rows, bins)
    order = golden_order(count)
    url = f"zmq://127.0.0.1:{free_port()}"
    settings = StreamSettings(batch_interval=0.3, iterations_per_batch=1, final_iterations=1)
    first = tmp_path / "out" / "tomo-scan" / "batch-00001.h5"

    def send() -> None:  # half, then the rest once a first volume is durable
        sink = open_sink(url)
        try:
            sink.send(start_record(angles[order], projections.shape[1:], "tomo-scan"))
            for k, index in enumerate(order):
                if k == count // 2:
                    deadline = time.monotonic() + 120
                    while not first.exists() and time.monotonic() < deadline:
                        time.sleep(0.05)
                sink.send(Frame("tomo-scan", k, projections[index], time.time()))
            sink.send(ScanEnd("tomo-scan", time.time()))
        finally:
            sink.close()

    with StreamDriver(spark, url, tmp_path / "out", settings, app="tomo") as driver:
        sender = threading.Thread(target=send)
        sender.start()
        summary = driver.run_scan(timeout=120)
        sender.join(60)
    assert summary["frames_used"] == count and summary["frames_applied_twice"] == 0
    assert summary["batch"] >= 3  # two or more volumes while it ran, then the final one
    with h5py.File(summary["file"]) as f:
        streamed = f["volume"][()]
        assert f["slices"].shape == (3, n, n) and int(f["projections"][()]) == count
    batch = fbp(projections.transpose(1, 0, 2), angles, n)
    np.testing.assert_allclose(streamed, batch, atol=1e-4 * np.abs(batch).max())
    assert (tmp_path / "out" / "tomo-scan" / "final.png").read_bytes().startswith(b"\x89PNG")
    live = Follower(str(tmp_path / "out")).newest()  # what spark-mpi view --follow shows
    shown = load(live)
    assert shown.volume.shape == (8, n, n) and shown.metadata["scan_id"] == "tomo-scan"
    assert len(shown.errors) >= 2 and shown.errors[0] == 1.0 and shown.errors[-1] < 1.0


def stream_detector_scan(spark, out, start, frames, settings) -> dict:
    """``frames`` sent by a simulated Stream V2 detector, reconstructed; the final summary."""
    url = f"stream-v2://127.0.0.1:{free_port()}"
    with StreamDriver(spark, url, out, settings, app="tomo") as driver:
        detector = threading.Thread(target=produce_stream_v2, args=(start, frames, url, 0.0))
        detector.start()
        try:
            return driver.run_scan(timeout=120)
        finally:
            detector.join(60)


def test_detector_counts_over_stream_v2_give_the_batch_fbp(spark, tmp_path):
    start, counts = scan_to_stream(None, phantom=24, projections=60, order="golden", counts=True)
    assert start.dtype == "uint16" and start.params["counts"]
    settings = StreamSettings(batch_interval=0.3, iterations_per_batch=1, final_iterations=1)
    summary = stream_detector_scan(spark, tmp_path / "out", start, counts, settings)
    assert summary["frames_used"] == 60 and summary["frames_applied_twice"] == 0
    with h5py.File(summary["file"]) as f:
        streamed = f["volume"][()]
    lines = line_integrals(counts, 60000.0, 0.0)
    batch = fbp(lines.transpose(1, 0, 2), np.array(start.params["angles_deg"]), 24)
    np.testing.assert_allclose(streamed, batch, atol=1e-4 * np.abs(batch).max())


@pytest.mark.skipif(not TOOTH.exists(), reason="shared tooth.h5 not present")
def test_the_real_tooth_scan_replayed_as_a_detector_stream(spark, tmp_path):
    url = f"zmq://127.0.0.1:{free_port()}"
    settings = StreamSettings(batch_interval=0.5, iterations_per_batch=1, final_iterations=1)
    with StreamDriver(spark, url, tmp_path / "out", settings, app="tomo") as driver:
        args = ["stream", "produce", "--app", "tomo", "--scan", str(TOOTH), "--to", url]
        producer = threading.Thread(
            target=lambda: done.update(result=spark_mpi(*args, "--order", "golden", "--rate", "0"))
        )
        done: dict = {}
        producer.start()
        summary = driver.run_scan(timeout=180)
        producer.join(240)
    assert done["result"].returncode == 0, done["result"].stderr[-2000:]
    assert summary["frames_used"] == 181 and summary["frames_lost"] == 0
    with h5py.File(summary["file"]) as f:
        image = f["volume"][1]
    n = image.shape[0]
    y, x = np.indices(image.shape) - (n - 1) / 2
    radius = np.hypot(x, y)
    tooth, background = image[radius < 0.3 * n], image[radius > 0.45 * n]
    assert np.percentile(tooth, 90) > 4 * max(np.percentile(np.abs(background), 90), 1e-3)
