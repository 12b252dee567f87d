"""The web viewer in a real browser: Debian's chromium, headless, driven by playwright."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from conftest import ARTIFACTS
from helpers import spark_mpi
from sparkmpi.apps.tomo.phantom import blobs_phantom
from sparkmpi.deploy.ports import free_port

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs Debian's chromium")


@pytest.fixture
def viewer():
    started = []

    def start(*args: str) -> str:
        port = free_port()
        command = [sys.executable, "-m", "sparkmpi.cli", "view", *args, "--port", str(port)]
        proc = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        started.append(proc)
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, "viewer exited"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                return f"http://127.0.0.1:{port}/"
            except OSError:
                assert time.monotonic() < deadline, "viewer did not listen"
                time.sleep(0.2)

    yield start
    for proc in started:
        if proc.poll() is not None:
            continue
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture
def page(tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1400, "height": 1000})
        yield context.new_page()
        context.close()
        browser.close()


def pixels(png: bytes) -> np.ndarray:
    import matplotlib.image

    return matplotlib.image.imread(io.BytesIO(png), format="png")[..., :3]


def keep(name: str, png: bytes) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / name).write_bytes(png)


def test_volume_renders_and_the_slice_follows_its_slider(viewer, page, tmp_path):
    volume = tmp_path / "phantom.npy"
    np.save(volume, blobs_phantom((48, 64, 64), n_blobs=12))
    page.goto(viewer(str(volume)))
    page.wait_for_selector("#slice-z")
    page.wait_for_timeout(2500)
    shot = page.locator("#volume-view").screenshot()
    keep("viewer-volume.png", page.screenshot())
    view = pixels(shot)
    background = view[:8, :8].reshape(-1, 3).mean(axis=0)
    differs = np.abs(view - background).sum(axis=-1) > 0.1
    assert 0.01 < differs.mean() < 0.9  # something drawn, not everything
    before = pixels(page.locator("#slice-z").screenshot())
    page.locator("#slider-z").fill("3")
    page.wait_for_timeout(1500)
    after = pixels(page.locator("#slice-z").screenshot())
    keep("viewer-slice-moved.png", page.screenshot())
    assert before.shape == after.shape and np.abs(before - after).mean() > 0.01
    assert "shape (z, y, x)" in page.locator("#metadata").inner_text()


def write_result(path, batch: int, frames: int, phase_scale: float) -> None:
    y, x = np.mgrid[:64, :64]
    obj = np.exp(1j * np.sin(x / (3.0 * phase_scale)) * np.cos(y / 7.0)).astype(np.complex64)
    summary = {"batch": batch, "frames_used": frames, "frames_expected": 64, "error": 0.1 / batch}
    tmp = path.with_name(path.name + ".tmp")
    with h5py.File(tmp, "w") as f:
        f["object"], f["probe"] = obj, np.ones((16, 16), np.complex64)
        f["errors"], f["illumination"] = np.geomspace(1, 0.1 / batch, 5 * batch), np.ones((64, 64))
        f["frames"] = np.arange(frames)
        f.attrs["summary"] = json.dumps(summary)
    tmp.rename(path)


def test_ptycho_result_shows_as_an_image(viewer, page, tmp_path):
    result = tmp_path / "rec.h5"
    write_result(result, 1, 64, 1.0)
    page.goto(viewer(str(result)))
    page.wait_for_selector("#image-view")
    page.wait_for_timeout(1500)
    image = pixels(page.locator("#image-view").screenshot())
    keep("viewer-image.png", page.screenshot())
    assert image.std() > 0.05


def test_live_mode_follows_new_results(viewer, page, tmp_path):
    run = tmp_path / "stream-out" / "scan1"
    run.mkdir(parents=True)
    write_result(run / "batch-00001.h5", 1, 16, 0.3)
    page.goto(viewer("--follow", str(run.parent)))
    page.wait_for_function("document.querySelector('#progress')?.innerText?.includes('batch 1')")
    page.wait_for_timeout(1000)
    first = pixels(page.locator("#image-view").screenshot())
    assert "16/64 frames" in page.locator("#progress").inner_text()
    keep("viewer-live-1.png", page.screenshot())
    write_result(run / "batch-00002.h5", 2, 48, 2.0)
    page.wait_for_function(
        "document.querySelector('#progress')?.innerText?.includes('batch 2')", timeout=20000
    )
    page.wait_for_timeout(1000)
    second = pixels(page.locator("#image-view").screenshot())
    keep("viewer-live-2.png", page.screenshot())
    assert "48/64 frames" in page.locator("#progress").inner_text()
    assert np.abs(first - second).mean() > 0.01


def test_missing_or_malformed_file_is_one_line(tmp_path):
    done = spark_mpi("view", str(tmp_path / "nope.h5"), timeout=60)
    assert done.returncode == 1 and done.stderr.count("\n") == 1 and "no such file" in done.stderr
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not hdf5")
    done = spark_mpi("view", str(bad), timeout=60)
    assert done.returncode == 1 and done.stderr.count("\n") == 1 and "cannot be read" in done.stderr


def test_a_taken_port_is_one_line(tmp_path):
    import socket

    volume = tmp_path / "v.npy"
    np.save(volume, np.zeros((4, 4, 4), np.float32))
    with socket.socket() as other:  # another program already serves on the port
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        done = spark_mpi("view", str(volume), "--port", str(port), timeout=60)
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert f"127.0.0.1:{port} is not free" in done.stderr and "--port" in done.stderr
    assert "http://" not in done.stdout  # no URL of someone else's server


def test_following_a_directory_that_a_run_will_create(tmp_path):
    from sparkmpi.viz.follow import Follower

    out = tmp_path / "not-yet"
    follower = Follower(str(out))  # the viewer may start before the driver
    assert follower.waiting_for_directory and follower.newest() is None
    (out / "scan-1").mkdir(parents=True)
    (out / "scan-1" / "batch-0001.h5").write_bytes(b"")
    assert not follower.waiting_for_directory
    assert follower.newest() == str(out / "scan-1" / "batch-0001.h5")
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(FileNotFoundError, match="not a results directory"):
        Follower(str(tmp_path / "a-file"))
