"""Faults injected at deterministic points of a streamed scan: the run heals itself (or a
restarted driver resumes), no frame is lost or applied twice by the ranks' own counts, and the
result is as good as an undisturbed run's."""

from __future__ import annotations

import pytest

from sparkmpi.apps.ptycho.simulate import simulate
from sparkmpi.bench.stream_faults import FaultRun, run_fault
from sparkmpi.deploy.ports import free_port
from sparkmpi.streaming.broker import TansuBroker

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

RUN = FaultRun(batch_timeout=30.0, outage_s=3.0)


@pytest.fixture(scope="module")
def scan():
    return simulate(48, 32)


@pytest.fixture(scope="module")
def undisturbed(scan, tmp_path_factory):
    url = f"zmq://127.0.0.1:{free_port()}"
    return run_fault("none", url, scan, tmp_path_factory.mktemp("none"), RUN)


@pytest.mark.parametrize(
    ("fault", "transport", "run"),
    [
        ("rank-kill", "kafka", RUN),
        ("rank-hang", "zmq", RUN),
        ("driver-kill", "kafka", FaultRun(batch_timeout=30.0, restart_ranks=3)),
        ("driver-kill", "zmq", RUN),
        ("broker-freeze", "kafka", RUN),
    ],
)
def test_a_fault_costs_no_frame_and_no_accuracy(scan, undisturbed, tmp_path, fault, transport, run):
    with TansuBroker() as broker:
        url = f"{broker.url}/{fault}" if transport == "kafka" else f"zmq://127.0.0.1:{free_port()}"
        figures = run_fault(fault, url, scan, tmp_path, run, broker)
    log = "\n".join(p.read_text()[-3000:] for p in tmp_path.glob("*.log"))
    assert figures["frames_lost"] == 0 and figures["frames_applied_twice"] == 0, log
    if fault.startswith("rank"):
        assert figures["recoveries"] == 1 and "recovery 1/3: new MPI session" in log
    if fault == "driver-kill":
        assert "resuming after batch" in log
    assert figures["resumed_after_s"] is not None
    assert figures["phase_error"] <= 2 * max(undisturbed["phase_error"], 1e-3), log
