"""The scan protocol: scan-start, frame and scan-end records, each a JSON header plus raw bytes.

A scan-start names the scan and says what its frames are (count, shape, dtype); the rest of its
header and its payload belong to the app (ptychography: positions, geometry, the initial
probe; see ``streaming.app``). A frame carries its index, the time it was produced and its
pixels. A scan-end closes the scan. Over Kafka the header is the ``sparkmpi`` message header
and the payload the message value; over ZeroMQ they are the two parts of a multipart
message. docs/streaming-records.md describes every field.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass, field

import numpy as np

HEADER = "sparkmpi"


class MalformedRecord(ValueError):
    """A record that does not follow the protocol; the message says what is wrong."""


_SCAN_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")


def scan_id_or_new(scan_id: str | None = None) -> str:
    """``scan_id`` checked (:func:`check_scan_id`), or a new random one (12 hex digits)."""
    return check_scan_id(scan_id or uuid.uuid4().hex[:12])


def check_scan_id(scan_id: object) -> str:
    """``scan_id`` if it is 1 to 128 of ``A-Z a-z 0-9 . _ -`` and not ``.`` or ``..`` (it names
    a directory under the output); :class:`MalformedRecord` saying why otherwise."""
    text = str(scan_id)
    if not _SCAN_ID.fullmatch(text) or text in (".", ".."):
        shown = text[:40] + ("..." if len(text) > 40 else "")
        raise MalformedRecord(
            f"scan id {shown!r} is not 1 to 128 of the characters A-Z a-z 0-9 . _ - "
            "(and not '.' or '..')"
        )
    return text


@dataclass
class ScanStart:
    """A scan begins: its id, how many frames and what they are; ``params`` are the app's own
    header fields (JSON, e.g. ptychography's positions and geometry) and ``data`` the app's
    payload bytes (e.g. the initial probe). The app checks and reads both."""

    scan_id: str
    frames: int
    shape: tuple[int, int]
    dtype: str
    params: dict = field(default_factory=dict)
    data: bytes = b""

    def header(self) -> dict:
        return {
            **self.params,
            "type": "scan-start",
            "scan_id": self.scan_id,
            "frames": self.frames,
            "shape": list(self.shape),
            "dtype": self.dtype,
        }

    def payload(self) -> bytes:
        return self.data

    def frame_bytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize


@dataclass
class Frame:
    scan_id: str
    index: int
    data: np.ndarray
    produced: float  # producer's wall-clock time.time()

    def header(self) -> dict:
        return {
            "type": "frame",
            "scan_id": self.scan_id,
            "index": self.index,
            "t": self.produced,
            "shape": list(self.data.shape),
            "dtype": str(self.data.dtype),
        }

    def payload(self) -> bytes:
        return np.ascontiguousarray(self.data).tobytes()


@dataclass
class ScanEnd:
    scan_id: str
    produced: float
    offsets: dict[int, int] = field(default_factory=dict)  # Kafka: end offset per partition

    def header(self) -> dict:
        offsets = {str(p): o for p, o in self.offsets.items()}
        return {"type": "scan-end", "scan_id": self.scan_id, "t": self.produced, "offsets": offsets}

    def payload(self) -> bytes:
        return b""


@dataclass
class Progress:
    """Kafka only: how far the producer's frames are delivered (end offset per partition), from
    its delivery reports, since the broker's high watermarks cannot be trusted."""

    scan_id: str
    offsets: dict[int, int]

    def header(self) -> dict:
        offsets = {str(p): o for p, o in self.offsets.items()}
        return {"type": "progress", "scan_id": self.scan_id, "offsets": offsets}

    def payload(self) -> bytes:
        return b""


Record = ScanStart | Frame | ScanEnd | Progress


def encode(record: Record) -> tuple[bytes, bytes]:
    """(header, payload) bytes of a record."""
    return json.dumps(record.header()).encode(), record.payload()


def _offsets(header: dict) -> dict[int, int]:
    return {int(p): int(o) for p, o in header.get("offsets", {}).items()}


FRAMES_MAX = 10_000_000


def _consistent(start: ScanStart) -> ScanStart:
    """``start`` if its frame count, shape and dtype make sense; :class:`MalformedRecord`
    naming the first that does not (a scan that cannot finish must not be accepted)."""
    why = None
    if not 1 <= start.frames <= FRAMES_MAX:
        why = f"frames={start.frames} is not 1..{FRAMES_MAX}"
    elif len(start.shape) != 2 or min(start.shape) < 1:
        why = f"frame shape {start.shape} is not two positive sizes"
    else:
        try:
            kind = np.dtype(start.dtype).kind
        except TypeError:
            kind = ""
        if kind == "" or kind not in "fiu":
            why = f"dtype {start.dtype!r} is not a real number type"
    if why:
        raise MalformedRecord(f"scan-start of scan {start.scan_id}: {why}")
    return start


def _matches_scan(meta: dict, index: int, scan: ScanStart) -> None:
    """:class:`MalformedRecord` if a frame header's own dtype or shape is not its scan's."""
    if "dtype" in meta:
        try:
            same = np.dtype(str(meta["dtype"])) == np.dtype(scan.dtype)
        except TypeError:
            same = False
        if not same:
            raise MalformedRecord(
                f"frame {index}: dtype {meta['dtype']}, the scan's is {scan.dtype}"
            )
    if "shape" in meta:
        try:
            shape = tuple(int(v) for v in meta["shape"])
        except (TypeError, ValueError):
            shape = None
        if shape != tuple(scan.shape):
            raise MalformedRecord(
                f"frame {index}: shape {meta['shape']!r}, the scan's is {tuple(scan.shape)}"
            )


def decode(header: bytes | None, payload: bytes | None, scan: ScanStart | None = None) -> Record:
    """The record in (header, payload); :class:`MalformedRecord` when it is not one, or when a
    frame does not fit ``scan`` (wrong scan id, index out of range, wrong size)."""
    try:
        meta = json.loads(header or b"")
        kind = meta["type"]
        scan_id = meta["scan_id"]
    except (ValueError, KeyError, TypeError) as exc:
        raise MalformedRecord(f"unreadable header ({type(exc).__name__}: {exc})") from None
    scan_id = check_scan_id(scan_id)
    payload = payload or b""
    try:
        if kind == "scan-start":
            generic = {"type", "scan_id", "frames", "shape", "dtype"}
            return _consistent(
                ScanStart(
                    scan_id,
                    int(meta["frames"]),
                    tuple(int(v) for v in meta["shape"]),
                    str(meta["dtype"]),
                    {k: v for k, v in meta.items() if k not in generic},
                    bytes(payload),
                )
            )
        if kind == "scan-end":
            return ScanEnd(scan_id, float(meta.get("t", time.time())), _offsets(meta))
        if kind == "progress":
            return Progress(scan_id, _offsets(meta))
        if kind != "frame":
            raise MalformedRecord(f"unknown record type {kind!r}")
        index, produced = int(meta["index"]), float(meta.get("t", 0.0))
        if scan is None:
            data = np.frombuffer(payload, dtype=np.dtype(str(meta.get("dtype", "float32"))))
            return Frame(scan_id, index, data, produced)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        if isinstance(exc, MalformedRecord):
            raise
        raise MalformedRecord(f"bad {kind} record ({type(exc).__name__}: {exc})") from None
    if scan_id != scan.scan_id:
        raise MalformedRecord(f"frame {index} of unknown scan {scan_id!r}")
    if not 0 <= index < scan.frames:
        raise MalformedRecord(f"frame index {index} outside 0..{scan.frames - 1}")
    _matches_scan(meta, index, scan)
    if len(payload) != scan.frame_bytes():
        raise MalformedRecord(f"frame {index}: {len(payload)} bytes, expected {scan.frame_bytes()}")
    data = np.frombuffer(payload, dtype=scan.dtype).reshape(scan.shape)
    return Frame(scan_id, index, data, produced)
