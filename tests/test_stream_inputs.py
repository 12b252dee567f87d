"""Scan ids from the network never become paths outside the output directory."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sparkmpi.streaming.driver import scan_dir
from sparkmpi.streaming.producer import produce
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
    meta.update(dtype="float32", positions=[[0.0, 0.0]] * 4, geometry={})
    meta.update(change)
    return json.dumps(meta).encode()


PROBE = np.zeros(4, np.complex64).tobytes()


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"positions": [[0.0, 0.0]] * 2}, r"\(2, 2\) positions for 4 frames"),
        ({"frames": 0}, "frames=0 is not"),
        ({"dtype": "complex64"}, "is not a real number type"),
        ({"dtype": "nonsense"}, "is not a real number type"),
        ({"positions": [[0.0, float("nan")]] * 4}, "not all finite"),
    ],
)
def test_a_scan_start_that_contradicts_itself_is_malformed(change, why):
    with pytest.raises(MalformedRecord, match=why):
        decode(start_header(**change), PROBE)


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
