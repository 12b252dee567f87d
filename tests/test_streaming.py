"""Streaming through a real Kafka-protocol broker (Tansu) and real ZeroMQ sockets."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import h5py
import pytest

from helpers import Log, spark_mpi
from sparkmpi.apps.ptycho.pipeline import reconstruct
from sparkmpi.apps.ptycho.simulate import simulate
from sparkmpi.apps.ptycho.solver import SolverSettings, phase_error
from sparkmpi.apps.ptycho.streaming import produce, start_record
from sparkmpi.deploy.ports import free_port
from sparkmpi.streaming.broker import TansuBroker
from sparkmpi.streaming.driver import StreamDriver, StreamSettings
from sparkmpi.streaming.endpoints import open_sink
from sparkmpi.streaming.protocol import Frame, ScanEnd, encode

FAST = StreamSettings(batch_interval=0.5, iterations_per_batch=5, final_iterations=40)


def send_frames(sink, scan, scan_id: str, indices) -> None:
    """Sends frames ``indices`` of ``scan`` through ``sink`` as fast as it takes them."""
    for index in indices:
        sink.send(Frame(scan_id, index, scan.intensities[index], time.time()))


@pytest.fixture(scope="module")
def scan():
    return simulate(96, 64)


def url_for(transport: str, broker, topic: str) -> str:
    return f"{broker.url}/{topic}" if transport == "kafka" else f"zmq://127.0.0.1:{free_port()}"


def stream(spark, url, scan, tmp_path, send, settings=FAST):
    """Runs one scan through a driver while ``send(url)`` produces it; the final summary."""
    log = Log()
    with StreamDriver(spark, url, tmp_path / "out", settings, log=log) as driver:
        producer = threading.Thread(target=send, args=(url,))
        producer.start()
        try:
            summary = driver.run_scan(timeout=60)
        finally:
            producer.join(60)
    return summary, log


@pytest.mark.parametrize("transport", ["kafka", "zmq"])
def test_streamed_scan_equals_the_batch_reconstruction(spark, broker, scan, tmp_path, transport):
    url = url_for(transport, broker, f"equal-{transport}")
    # as many iterations over all frames at the end as the batch run makes, so the result
    # does not depend on how many batches the frames happened to arrive in
    settings = StreamSettings(batch_interval=0.5, iterations_per_batch=5, final_iterations=100)
    send = lambda u: produce(scan, u, rate_hz=60)  # noqa: E731
    summary, log = stream(spark, url, scan, tmp_path, send, settings)
    assert summary["frames_used"] == 96 and summary["frames_lost"] == 0, log
    assert summary["last_frame_to_result_s"] < 30
    with h5py.File(summary["file"]) as f:
        streamed, frames = f["object"][()], f["frames"][()]
        lit = f["illumination"][()] > 0.5 * f["illumination"][()].max()
    assert sorted(frames) == list(range(96))
    batch, _ = reconstruct(spark, scan, SolverSettings("raar", 100), ranks=2, output=lambda *a: 0)
    assert phase_error(streamed, batch.object, lit.astype(float), remove_ramp=True) < 0.05
    assert phase_error(streamed, scan.truth_object, lit.astype(float), remove_ramp=True) < 0.05
    assert any(line.startswith("batch 1:") and "latency" in line for line in log)


def send_with_garbage(scan, scan_id="garbage-scan"):
    def send(url):
        sink = open_sink(url)
        try:
            sink.send(start_record(scan, scan_id))
            for index, frame in enumerate(scan.intensities):
                sink.send(Frame(scan_id, index, frame, time.time()))
                if index == 10:
                    header, _ = encode(Frame(scan_id, 11, frame, time.time()))
                    sink.send_raw(header, b"short", partition=3)  # wrong size
                    header, payload = encode(Frame("no-such-scan", 12, frame, time.time()))
                    sink.send_raw(header, payload, partition=0)  # unknown scan id
                    sink.send_raw(b"{not json", b"xyz", partition=1)  # garbage header
                    header, payload = encode(Frame(scan_id, 5, frame, time.time()))
                    sink.send_raw(header, payload, partition=5 % 4)  # a duplicate
            sink.send(ScanEnd(scan_id, time.time()))
        finally:
            sink.close()

    return send


@pytest.mark.parametrize("transport", ["kafka", "zmq"])
def test_malformed_records_are_reported_and_skipped(spark, broker, scan, tmp_path, transport):
    url = url_for(transport, broker, f"garbage-{transport}")
    summary, log = stream(spark, url, scan, tmp_path, send_with_garbage(scan))
    assert summary["frames_used"] == 96 and summary["frames_lost"] == 0
    assert summary["malformed"] == 3 and summary["dropped_duplicates"] == 1
    text = "\n".join(log)
    assert "frame 11: 5 bytes, expected 16384" in text
    assert "unknown scan 'no-such-scan'" in text
    assert "unreadable header" in text


def test_broker_down_at_start_is_one_clear_line(tmp_path):
    dead = f"kafka://127.0.0.1:{free_port()}/frames"
    done = spark_mpi("stream", "run", "--source", dead, "--out", str(tmp_path), timeout=120)
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and "broker not reachable" in done.stderr


def test_bad_stream_url_is_one_clear_line(tmp_path):
    done = spark_mpi("stream", "run", "--source", "http://x:1/y", "--out", str(tmp_path))
    assert done.returncode == 1 and "kafka://HOST:PORT/TOPIC" in done.stderr


def test_lost_broker_connection_is_retried_with_backoff(spark, scan, tmp_path):
    with TansuBroker() as own:
        url = f"{own.url}/lost"
        log = Log()
        driver = StreamDriver(spark, url, tmp_path / "out", FAST, log=log)
        result = {}
        runner = threading.Thread(target=lambda: result.update(summary=driver.run_scan(60)))
        sink = open_sink(url)
        sink.send(start_record(scan, "lost-scan"))
        runner.start()
        for index in range(20):
            sink.send(Frame("lost-scan", index, scan.intensities[index], time.time()))
        sink.close()
        deadline = time.monotonic() + 60
        while not any(line.startswith("batch 1:") for line in log):
            assert time.monotonic() < deadline, log
            time.sleep(0.2)
        own.stop()
        while sum("retrying in" in line for line in log) < 2:
            assert time.monotonic() < deadline + 30, log
            time.sleep(0.2)
        assert runner.is_alive()  # still trying, not crashed
        driver.stop()
        runner.join(30)
        driver.close()
    assert result["summary"] is None and not runner.is_alive()
    waits = [
        float(line.split("retrying in ")[1].split()[0]) for line in log if "retrying in" in line
    ]
    assert waits[1] > waits[0]  # backs off


@pytest.mark.timeout(400)
def test_driver_killed_mid_scan_resumes_and_uses_every_frame_once(broker, scan, tmp_path):
    url, out = f"{broker.url}/restart", tmp_path / "out"
    command = [sys.executable, "-m", "sparkmpi.cli", "stream", "run", "--source", url]
    command += ["--out", str(out), "--batch-interval", "1s", "--iterations", "3"]
    command += ["--final-iterations", "20", "--wait", "120"]

    def driver(log_name):
        with open(tmp_path / log_name, "w") as log:  # the child keeps its own descriptor
            return subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    scan_id, half = "restart-scan", len(scan.intensities) // 2
    sink, drivers = open_sink(url), []
    try:
        drivers.append(first := driver("first.log"))
        sink.send(start_record(scan, scan_id))
        send_frames(sink, scan, scan_id, range(half))  # the rest only once the driver is dead
        sink.flush()  # the driver learns how far the scan got from the published progress
        state = out / scan_id / "checkpoint" / "state.json"
        deadline = time.monotonic() + 180
        while not (state.exists() and len(json.loads(state.read_text())["used"]) >= 16):
            assert time.monotonic() < deadline, (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(0.2)
        os.killpg(first.pid, signal.SIGKILL)  # the driver, its JVM and everything it started
        first.wait(30)
        assert 16 <= len(json.loads(state.read_text())["used"]) <= half
        drivers.append(second := driver("second.log"))
        send_frames(sink, scan, scan_id, range(half, len(scan.intensities)))
        sink.send(ScanEnd(scan_id, time.time()))
        sink.flush()
        assert second.wait(240) == 0, (tmp_path / "second.log").read_text()[-3000:]
    finally:
        sink.close()
        for process in drivers:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(30)
    text = (tmp_path / "second.log").read_text()
    assert "resuming after batch" in text
    assert f"reading {url}, writing results to {out}" in text  # where it listens and writes
    assert "waiting for a scan to start" in text
    with h5py.File(out / "restart-scan" / "final.h5") as f:
        applied = list(f["applied"][()])  # counted by the ranks as they gave frames to the app
        summary = json.loads(f.attrs["summary"])
    assert applied == [1] * 96 and summary["frames_used"] == 96
    assert summary["frames_applied_twice"] == 0


def test_the_demo_commands_with_zeromq(tmp_path):
    cxi, out = tmp_path / "scan.cxi", tmp_path / "out"
    assert (
        spark_mpi("ptycho", "simulate", str(cxi), "--frames", "32", "--size", "32").returncode == 0
    )
    url = f"zmq://127.0.0.1:{free_port()}"
    command = [sys.executable, "-m", "sparkmpi.cli", "stream", "run", "--source", url]
    command += ["--out", str(out), "--batch-interval", "500ms", "--wait", "120"]
    with open(tmp_path / "run.log", "w") as log:
        run = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        done = spark_mpi("stream", "produce", "--scan", str(cxi), "--rate", "50", "--to", url)
        assert done.returncode == 0, done.stderr[-2000:]
        assert "32 frames sent" in done.stdout
        assert run.wait(180) == 0, (tmp_path / "run.log").read_text()[-3000:]
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    text = (tmp_path / "run.log").read_text()
    assert "32 frames used, 0 missing, 0 applied twice" in text
    (final,) = out.glob("*/final.png")
    assert final.read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize("transport", ["kafka", "zmq"])
def test_scans_that_cannot_finish_never_block_the_next(spark, broker, scan, tmp_path, transport):
    url = url_for(transport, broker, f"stuck-{transport}")
    settings = StreamSettings(0.5, 5, 40, idle_timeout=2.0)
    bad = start_record(scan, "contradicts")
    bad.params["positions"] = bad.params["positions"][:2]  # 2 positions for 96 frames
    log = Log()
    with StreamDriver(spark, url, tmp_path / "out", settings, log=log) as driver:
        sink = open_sink(url)
        try:
            sink.send(bad)
            sink.send(start_record(scan, "stuck"))  # its producer dies after 5 frames
            send_frames(sink, scan, "stuck", range(5))
            if transport == "kafka":
                sink.flush()  # publishes how far stuck's frames got
            sink.send(start_record(scan, "next"))
            send_frames(sink, scan, "next", range(96))
            sink.send(ScanEnd("next", time.time()))
            if transport == "kafka":
                sink.flush()
            stuck = driver.run_scan(timeout=60)
            following = driver.run_scan(timeout=60)
        finally:
            sink.close()
    text = "\n".join(log)
    assert "skipped a scan: scan-start of scan contradicts: (2, 2) positions for 96" in text
    assert stuck["scan_id"] == "stuck" and stuck["incomplete"] and stuck["frames_used"] == 5
    assert "scan stuck closed as incomplete (idle): 5 frames used, 91 missing" in text
    with h5py.File(tmp_path / "out" / "stuck" / "final.h5") as f:
        assert json.loads(f.attrs["summary"])["incomplete"] is True
    assert following["scan_id"] == "next" and not following["incomplete"]
    assert following["frames_used"] == 96 and following["frames_applied_twice"] == 0
    if transport == "kafka":  # a new driver, fresh output: finished scans are not replayed
        with StreamDriver(spark, url, tmp_path / "again", settings, log=log) as driver:
            sink = open_sink(url)
            try:
                sink.send(start_record(scan, "third"))
                send_frames(sink, scan, "third", range(96))
                sink.send(ScanEnd("third", time.time()))
                sink.flush()
                third = driver.run_scan(timeout=60)
            finally:
                sink.close()
        assert third["scan_id"] == "third" and third["frames_used"] == 96
