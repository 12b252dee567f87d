"""Shared fixtures: one local SparkSession, and a check that no rank process outlives a test."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from helpers import rank_processes

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


@pytest.fixture(scope="session")
def spark():
    from sparkmpi.runner.context import spark_session

    session = spark_session(cores=4, app_name="spark-mpi tests")
    yield session
    session.stop()


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
