"""``spark-mpi bench stream-bluesky --quick``: a Bluesky run (RunEngine, ophyd.sim, Kafka)
and its CXI file reconstructed with the same settings."""

from __future__ import annotations

import pytest

from helpers import run_bench


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_bench_stream_bluesky_quick(tmp_path):
    _, data = run_bench(tmp_path, "stream-bluesky", "--quick", timeout=580)
    assert (data["frames"], data["frame_size"]) == (32, 64)
    runs = data["runs"]
    assert [r["source"].split()[0] for r in runs] == ["cxi", "bluesky"]
    for r in runs:
        assert r["frames_used"] == 32 and r["frames_lost"] == 0
        assert r["frames_applied_twice"] == 0 and r["malformed"] == 0
        assert sum(r["batch_frames"]) == 32
        assert 0 < r["phase_error_rad"] < 0.2 and r["after_produce_s"] > 0
    assert isinstance(data["goal_met"], bool) and data["goal"]
    assert data["relative_difference"] >= 0 and "commit" in data["provenance"]
