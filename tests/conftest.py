"""Shared fixtures: one local SparkSession, and a check that no rank process outlives a test."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from helpers import rank_processes

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
NETNS_SUBNET = "10.78.0.0/24"
"""The multi-node tests' nodes; a second root address in ``10.79.0.0/24`` reaches none of them."""


@pytest.fixture(scope="session")
def spark():
    from sparkmpi.runner.context import spark_session

    session = spark_session(cores=4, app_name="spark-mpi tests")
    yield session
    session.stop()


@pytest.fixture(scope="module")
def broker():
    """A Kafka-protocol broker (Tansu, in memory) for the tests of one module."""
    from sparkmpi.streaming.broker import TansuBroker

    with TansuBroker() as running:
        yield running


@pytest.fixture(autouse=True)
def no_rank_left_behind():
    yield
    deadline = time.monotonic() + 10
    while rank_processes() and time.monotonic() < deadline:
        time.sleep(0.1)
    left = rank_processes()
    for proc in left:
        proc.kill()
    assert not left, f"rank processes left behind: {[p.pid for p in left]}"


class Captured:
    """Collects what ranks print, as an ``output=`` sink."""

    def __init__(self) -> None:
        self.lines: list[tuple[int, str, str]] = []

    def __call__(self, rank: int, stream: str, text: str) -> None:
        self.lines.extend((rank, stream, line) for line in text.splitlines())


@pytest.fixture
def captured() -> Captured:
    return Captured()


@pytest.fixture(scope="session")
def netns_cluster(tmp_path_factory):
    """Three nodes in network namespaces (2, 1 and 1 cores) on a bridge, a Spark worker in
    each, the master in the root namespace; shared by the multi-node tests (root only)."""
    from sparkmpi.deploy.netns import NetnsCluster, netns_unavailable

    why = netns_unavailable()
    if why:
        pytest.skip(f"multi-node tests need network namespaces: {why}")
    state = tmp_path_factory.mktemp("netns")
    prefix = f"t{os.getpid() % 100000}"
    cluster = NetnsCluster(state, nodes=3, cores=[2, 1, 1], prefix=prefix, subnet=NETNS_SUBNET)
    cluster.start()
    yield cluster
    cluster.stop()
