"""Scan ids from the network never become paths outside the output directory."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sparkmpi.apps.ptycho.streaming import PtychoStream, produce
from sparkmpi.streaming.driver import scan_dir
from sparkmpi.streaming.protocol import MalformedRecord, check_scan_id, decode

BAD_IDS = ["../x", "../../etc", "/abs/path", "a b", "..", ".", "", "x" * 129, "sc\u00e4n", "a/b"]


def header(scan_id: str, kind: str) -> bytes:
    meta = {"type": kind, "scan_id": scan_id, "index": 0, "t": 0.0, "offsets": {}}
    meta.update(frames=1, shape=[1, 1], dtype="float32", positions=[[0.0, 0.0]])
    return json.dumps(meta).encode()


@pytest.mark.parametrize("scan_id", BAD_IDS)
@pytest.mark.parametrize("kind", ["scan-start", "frame", "scan-end", "progress"])
def test_records_with_a_bad_scan_id_are_malformed(scan_id, kind):
    payload = np.zeros(1, np.complex64).tobytes() if kind == "scan-start" else b"\0" * 4
    with pytest.raises(MalformedRecord, match=r"scan id .* is not 1 to 128 of the characters"):
        decode(header(scan_id, kind), payload)


def test_a_good_scan_id_is_kept():
    record = decode(header("scan-01.a_B", "scan-start"), np.zeros(1, np.complex64).tobytes())
    assert record.scan_id == "scan-01.a_B" == check_scan_id("scan-01.a_B")


def test_scan_directories_stay_inside_the_output(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    assert scan_dir(out, "s1") == (out / "s1").resolve()
    (out / "escape").symlink_to(tmp_path)  # a link planted in the output directory
    with pytest.raises(MalformedRecord, match="is not inside the output"):
        scan_dir(out, "escape")
    for scan_id in BAD_IDS:
        with pytest.raises(MalformedRecord):
            scan_dir(out, scan_id)


def test_the_producer_refuses_a_bad_scan_id_before_sending_anything():
    with pytest.raises(MalformedRecord, match=r"'\.\./x'"):
        produce(None, "zmq://127.0.0.1:9", 0, "../x")


def start_header(**change) -> bytes:
    meta = {"type": "scan-start", "scan_id": "s", "frames": 4, "shape": [2, 2]}
    positions = [[0.0, 0.0], [0.0, 1.5], [1.5, 0.0], [1.5, 1.5]]
    geometry = {"energy_ev": 8000.0, "distance_m": 1.0, "pixel_size_m": 5.5e-5}
    meta.update(dtype="float32", positions=positions, geometry=geometry)
    meta.update(change)
    return json.dumps(meta).encode()


PROBE = np.ones(4, np.complex64).tobytes()


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"frames": 0}, "frames=0 is not"),
        ({"shape": [0, 2]}, "is not two positive sizes"),
        ({"dtype": "complex64"}, "is not a real number type"),
        ({"dtype": "nonsense"}, "is not a real number type"),
    ],
)
def test_a_scan_start_that_contradicts_itself_is_malformed(change, why):
    with pytest.raises(MalformedRecord, match=why):
        decode(start_header(**change), PROBE)


@pytest.mark.parametrize(
    ("change", "probe", "why"),
    [
        ({"positions": [[0.0, 0.0]] * 2}, PROBE, r"\(2, 2\) positions for 4 frames"),
        ({"positions": [[0.0, float("nan")]] * 4}, PROBE, "not all finite"),
        ({"positions": "here"}, PROBE, r"not a list of \[row, col\] numbers"),
        ({"positions": [[0, 0], [0, 1e-6], [1e-6, 0], [1e-6, 1e-6]]}, PROBE, "not metres"),
        ({"positions": [[0, 0], [0, 1e9], [1e9, 0], [1, 1]]}, PROBE, "more than 268435456"),
        ({"positions": [[3e4, 3e4], [3e4, 3e4 + 2], [3e4 + 2, 3e4], [3e4, 3e4]]}, PROBE, "more"),
        ({"geometry": {"energy_ev": True, "distance_m": 1, "pixel_size_m": 1}}, PROBE, "True"),
        ({"geometry": {}}, PROBE, "geometry energy_ev is None"),
        ({"geometry": {"energy_ev": 8e3, "distance_m": -1, "pixel_size_m": 1}}, PROBE, "distance"),
        ({}, np.zeros(4, np.complex64).tobytes(), "the probe is zero"),
        ({}, np.ones(3, np.complex64).tobytes(), "probe of 3 complex64 values"),
        ({"shape": [2, 4]}, PROBE, "needs square frames"),
    ],
)
def test_an_implausible_ptychography_scan_start_is_refused_with_one_line(change, probe, why):
    start = decode(start_header(**change), probe)  # the streaming layer accepts it
    with pytest.raises(MalformedRecord, match=why) as refused:
        PtychoStream.check_start(start)
    assert "\n" not in str(refused.value) and str(refused.value).startswith("scan-start of scan s")


def test_a_plausible_scan_start_passes_the_app_check():
    start = decode(start_header(), PROBE)
    PtychoStream.check_start(start)
    assert start.params["geometry"]["energy_ev"] == 8000.0


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"dtype": "float64"}, "dtype float64, the scan's is float32"),
        ({"shape": [4, 1]}, r"shape \[4, 1\], the scan's is \(2, 2\)"),
        ({"shape": "2x2"}, "shape '2x2'"),
    ],
)
def test_a_frame_whose_header_disagrees_with_its_scan_is_malformed(change, why):
    scan = decode(start_header(), PROBE)
    meta = {"type": "frame", "scan_id": "s", "index": 1, "t": 0.0, "shape": [2, 2]}
    meta.update({"dtype": "float32", **change})
    with pytest.raises(MalformedRecord, match=why):
        decode(json.dumps(meta).encode(), np.zeros(4, np.float32).tobytes(), scan)


@pytest.mark.parametrize(
    "meta",
    [
        {"type": "frame", "scan_id": "s", "index": 0, "t": "noon"},
        {"type": "frame", "scan_id": "s", "index": 0, "t": None},
        {"type": "frame", "scan_id": "s", "index": 0, "dtype": "no-such-type"},
        {"type": "progress", "scan_id": "s", "offsets": [1, 2]},
        {"type": "scan-end", "scan_id": "s", "offsets": "all"},
    ],
)
def test_odd_field_values_are_malformed_records_not_crashes(meta):
    with pytest.raises(MalformedRecord, match="bad"):
        decode(json.dumps(meta).encode(), np.zeros(4, np.float32).tobytes())
