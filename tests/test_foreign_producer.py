"""A producer written only from docs/streaming-records.md (tests/foreign_producer.py, no
sparkmpi import) streams a simulated scan over Kafka and ZeroMQ; the driver must use every
frame and reconstruct the simulated object."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from helpers import Log
from sparkmpi.apps.ptycho.simulate import simulate
from sparkmpi.apps.ptycho.solver import phase_error
from sparkmpi.deploy.ports import free_port
from sparkmpi.streaming.driver import StreamDriver, StreamSettings

SCRIPT = Path(__file__).with_name("foreign_producer.py")
SETTINGS = StreamSettings(batch_interval=0.5, iterations_per_batch=5, final_iterations=60)
FRAMES = 48
ALLOWED_IMPORTS = {
    "__future__",
    "argparse",
    "confluent_kafka",
    "h5py",
    "json",
    "numpy",
    "sys",
    "time",
    "zmq",
}


@pytest.fixture(scope="module")
def scan_npz(tmp_path_factory):
    """A simulated scan and the .npz the foreign producer reads it from."""
    scan = simulate(FRAMES, 64)
    path = tmp_path_factory.mktemp("scan") / "scan.npz"
    np.savez(
        path,
        intensities=scan.intensities,
        positions=scan.positions,
        probe=scan.probe,
        energy_ev=scan.energy_ev,
        distance_m=scan.distance_m,
        pixel_size_m=scan.pixel_size_m,
    )
    return scan, path


def test_the_foreign_producer_imports_no_sparkmpi():
    text = SCRIPT.read_text()
    imported = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    assert "sparkmpi" not in imported
    assert imported <= ALLOWED_IMPORTS, imported - ALLOWED_IMPORTS
    assert "import sparkmpi" not in text and "from sparkmpi" not in text


@pytest.mark.timeout(400)
@pytest.mark.parametrize("transport", ["kafka", "zmq"])
def test_a_producer_written_from_the_docs_streams_a_scan(
    spark, request, scan_npz, tmp_path, transport
):
    scan, path = scan_npz
    if transport == "kafka":
        url = f"{request.getfixturevalue('broker').url}/foreign"
    else:
        url = f"zmq://127.0.0.1:{free_port()}"
    scan_id = f"foreign-{transport}"
    command = [sys.executable, str(SCRIPT), "--scan", str(path), "--to", url]
    command += ["--scan-id", scan_id, "--rate", "100"]
    log = Log()
    output = tmp_path / "producer.log"
    with StreamDriver(spark, url, tmp_path / "out", SETTINGS, log=log) as driver:
        with open(output, "w") as out:  # a file, not a pipe: nothing can block on it
            producer = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        try:
            summary = driver.run_scan(timeout=120)
            returncode = producer.wait(60)
        finally:
            if producer.poll() is None:
                producer.kill()
                producer.wait(10)
    produced = output.read_text()
    assert returncode == 0, produced
    assert summary is not None, (produced, log)
    assert summary["frames_used"] == FRAMES and summary["frames_lost"] == 0, (produced, log)
    assert summary["malformed"] == 0, log
    with h5py.File(summary["file"]) as f:
        final = f["object"][()]
        illumination = f["illumination"][()]
    lit = (illumination > 0.5 * illumination.max()).astype(float)
    assert phase_error(final, scan.truth_object, lit, remove_ramp=True) < 0.1
