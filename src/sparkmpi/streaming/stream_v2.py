"""DECTRIS Stream V2 as a driver source: EIGER/PILATUS detectors PUSH one CBOR message per
ZeroMQ message (``start``, ``image``, ``end``); the source CONNECTs a PULL socket to the
detector (``stream-v2://DCU:31001``), as the specification asks of clients.

The receiving thread reads only each message's header fields; the image itself (RFC 8746
arrays, DECTRIS compression tag 56500) is decoded and decompressed on the rank that owns the
frame (:meth:`StreamV2Image.frames`). docs/streaming-stream-v2.md describes what is supported
and the ``user_data`` convention that carries an app's scan parameters.
"""

from __future__ import annotations

import json
import pickle
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from sparkmpi.streaming.protocol import FRAMES_MAX, Frame, MalformedRecord, ScanStart, check_scan_id
from sparkmpi.streaming.queued import QueuedSource
from sparkmpi.streaming.stream_v2_cbor import DTYPES, loads, plain

PORT = 31001
MAX_MESSAGE_BYTES = 256 << 20
USER_DATA_KEY = "sparkmpi"


def _uint(message: Mapping, key: str) -> int:
    value = message.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise MalformedRecord(f"{message.get('type')} message: {key} is {value!r}, not a count")
    return value


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def scan_id_of(series_id: int, unique_id: object) -> str:
    """``series-<id>``, plus the series unique id with characters a scan id may not hold
    replaced by ``_`` (so a detector that restarts its numbering starts new scans)."""
    text = f"series-{series_id}"
    if isinstance(unique_id, str) and unique_id:
        text += "-" + _UNSAFE.sub("_", unique_id)
    return check_scan_id(text[:128])


def start_record(message: Mapping, channel: str | None = None) -> ScanStart:
    """The scan-start of a ``start`` message: the series' frames of ``channel`` (default: the
    first), the app's params and payload from ``user_data["sparkmpi"]``; the series' own
    identity under ``params["stream_v2"]``. :class:`MalformedRecord` naming the bad field."""
    series = _uint(message, "series_id")
    unique = message.get("series_unique_id", "")
    scan_id = scan_id_of(series, unique)
    frames = _uint(message, "number_of_images")
    shape = (_uint(message, "image_size_y"), _uint(message, "image_size_x"))
    dtype = message.get("image_dtype")
    channels = message.get("channels")
    why = None
    if not 1 <= frames <= FRAMES_MAX:
        why = f"number_of_images {frames} is not 1..{FRAMES_MAX}"
    elif min(shape) < 1:
        why = f"image size {shape} is not two positive sizes"
    elif dtype not in DTYPES:
        why = f"image_dtype {dtype!r} is not one of {', '.join(DTYPES)}"
    elif not isinstance(channels, list | tuple) or not channels:
        why = f"channels is {channels!r}, not a list of names"
    elif channel is not None and channel not in channels:
        why = f"channel {channel!r} is not one of {list(channels)}"
    if why:
        raise MalformedRecord(f"start of {scan_id}: {why}")
    user = message.get("user_data")
    ours = user.get(USER_DATA_KEY, {}) if isinstance(user, Mapping) else {}
    if not isinstance(ours, Mapping):
        raise MalformedRecord(f"start of {scan_id}: user_data.{USER_DATA_KEY} is not a map")
    payload = ours.get("payload", b"")
    if not isinstance(payload, bytes | np.ndarray):
        raise MalformedRecord(f"start of {scan_id}: user_data.{USER_DATA_KEY}.payload is no bytes")
    params = plain(ours.get("params", {}))
    try:
        json.dumps(params, allow_nan=False)
    except (TypeError, ValueError):
        params = None
    if not isinstance(params, dict):
        raise MalformedRecord(f"start of {scan_id}: user_data.{USER_DATA_KEY}.params is not JSON")
    identity = {"series_id": series, "series_unique_id": str(unique)}
    params["stream_v2"] = {**identity, "channel": channel or str(channels[0])}
    data = payload.tobytes() if isinstance(payload, np.ndarray) else bytes(payload)
    return ScanStart(scan_id, frames, shape, dtype, params, data)


@dataclass(frozen=True)
class StreamV2Image:
    """One ``image`` message as received (``message``) and the frame index the receiving
    thread read from it; :meth:`frames` decodes it on the rank."""

    scan_id: str
    index: int
    message: bytes
    received: float

    def __reduce_ex__(self, protocol):
        message = pickle.PickleBuffer(self.message) if protocol >= 5 else self.message
        return (_image, (self.scan_id, self.index, message, self.received))

    def frames(self, scan: ScanStart) -> list[Frame]:
        """The frame of ``scan`` this message holds, decompressed and checked: same series,
        image id in range, the channel's array of the scan's shape and dtype;
        :class:`MalformedRecord` naming the first field that is wrong."""
        where = f"image {self.index} of {self.scan_id}"
        ident = scan.params.get("stream_v2", {})
        limit = scan.frame_bytes()
        try:
            message = loads(self.message, limit)
        except MalformedRecord as exc:
            raise MalformedRecord(f"{where}: {exc}") from None
        if message["type"] != "image":
            raise MalformedRecord(f"{where}: type is {message['type']!r}, not 'image'")
        series = message.get("series_id")
        if self.scan_id != scan.scan_id or series != ident.get("series_id"):
            raise MalformedRecord(f"{where}: series_id {series!r} is not the scan's")
        unique = message.get("series_unique_id", "")
        if str(unique) != ident.get("series_unique_id", ""):
            raise MalformedRecord(f"{where}: series_unique_id {unique!r} is not the scan's")
        image_id = message.get("image_id")
        if image_id != self.index or not 0 <= self.index < scan.frames:
            raise MalformedRecord(f"{where}: image_id {image_id!r} outside 0..{scan.frames - 1}")
        data = message.get("data")
        channel = ident.get("channel")
        array = data.get(channel) if isinstance(data, Mapping) else None
        if not isinstance(array, np.ndarray):
            raise MalformedRecord(f"{where}: data has no array for channel {channel!r}")
        if array.shape != tuple(scan.shape):
            raise MalformedRecord(f"{where}: data shape {array.shape}, the scan's is {scan.shape}")
        want = np.dtype(scan.dtype)
        if (array.dtype.kind, array.dtype.itemsize) != (want.kind, want.itemsize):
            raise MalformedRecord(f"{where}: data dtype {array.dtype}, the scan's is {want}")
        return [Frame(scan.scan_id, self.index, array.astype(want, copy=False), self.received)]


def _kind_and_series(raw: bytes) -> tuple[str, tuple]:
    """A message's type and series identity (both empty if it does not parse)."""
    try:
        message = loads(raw)
        return message["type"], (message.get("series_id"), str(message.get("series_unique_id", "")))
    except MalformedRecord:
        return "", ()


def image_key(message: Mapping) -> tuple[str, int]:
    """(scan id, frame index) of an ``image`` message, from its header alone."""
    series = _uint(message, "series_id")
    return scan_id_of(series, message.get("series_unique_id", "")), _uint(message, "image_id")


def _image(scan_id: str, index: int, message, received: float) -> StreamV2Image:
    """Unpickles a :class:`StreamV2Image` whose message travelled out of band."""
    return StreamV2Image(scan_id, index, bytes(message), received)


class StreamV2Source(QueuedSource):
    """Driver side: a PULL socket connected to a detector's Stream V2 PUSH socket at
    ``tcp://host:port``, read by a background thread. Each series is one scan; its images wait
    in a queue until the driver takes the scan. A message that cannot be used is logged (one
    line), counted in :attr:`rejected` and dropped; the thread never stops on one."""

    def __init__(
        self,
        host: str,
        port: int = PORT,
        log=print,
        channel: str | None = None,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        on_ranks: bool = False,
    ):
        from sparkmpi.streaming.stream_v2_ranks import PullThread, RankInput

        self.log, self.channel = log, channel
        self.endpoint = f"tcp://{host}:{port}"
        self._init_queue()  # of StreamV2Image
        self.rejected = 0
        self._series: dict[tuple[int, str], ScanStart] = {}  # every series started, by identity
        self._last: str | None = None  # the newest series
        self._dropped: set[str] = set()
        self._batches: dict[str, tuple[int, int]] = {}  # scan id -> (quiet batches, used)
        self._early_ends: list = []  # relayed ends whose start has not come yet
        spec = RankInput(self.endpoint, max_message_bytes)
        self.rank_input = spec if on_ranks else None  # then the ranks connect, not the driver
        self._pull = None if on_ranks else PullThread(spec, self._handle, "sparkmpi-sv2")

    def _handle(self, message: bytes) -> None:
        try:
            with self._lock:
                self._take(message)
        except MalformedRecord as exc:
            self.rejected += 1
            self.log(f"stream-v2: skipped a message: {exc}")
        except Exception as exc:  # a bad message never stops the thread
            self.rejected += 1
            self.log(f"stream-v2: skipped a message ({type(exc).__name__}: {exc})")

    def relay(self, messages: list[bytes]) -> None:
        """Handles the ``start``/``end`` messages the ranks received (``clients=ranks``) as
        if this source's socket had. Messages that reached different ranks have no order, so
        starts go first, and an ``end`` of a series not started yet waits for up to three more
        calls (its ``start`` may be on its way) before it is handled, and refused."""
        waiting, self._early_ends = self._early_ends, []
        fresh = [(_kind_and_series(m), m, 0) for m in messages]
        for (kind, series), message, tries in sorted(
            [*fresh, *waiting], key=lambda item: item[0][0] != "start"
        ):
            if kind == "end" and series not in self._series and tries < 3:
                self._early_ends.append(((kind, series), message, tries + 1))
            else:
                self._handle(message)

    def note_batch(self, new_frames: int, used_frames: int) -> None:
        """What a batch took (``clients=ranks``): the scan is complete once its end is in and
        every frame is used, or three batches after its end brought nothing (images the
        detector sent to other sockets may arrive after the end)."""
        if self.scan is None:
            return
        quiet, _ = self._batches.get(self.scan.scan_id, (0, 0))
        quiet = quiet + 1 if self._scan_ended() and not new_frames else 0
        self._batches[self.scan.scan_id] = (quiet, used_frames)

    def _scan_ended(self) -> bool:
        return self.scan is not None and self.scan.scan_id in self._ended

    @property
    def ended(self) -> bool:
        return self.complete() if self.rank_input is not None else super().ended

    def complete(self) -> bool:
        if self.rank_input is None:
            return super().complete()
        if not self._scan_ended():
            return False
        quiet, used = self._batches.get(self.scan.scan_id, (0, 0))
        return used >= self.scan.frames or quiet >= 3

    def _known(self, message: Mapping) -> ScanStart:
        kind = message["type"]
        key = (_uint(message, "series_id"), str(message.get("series_unique_id", "")))
        scan = self._series.get(key)
        if scan is None:
            raise MalformedRecord(f"{kind} message of series {key[0]}, which has no start")
        if scan.scan_id in self._ended:
            raise MalformedRecord(f"{kind} message of {scan.scan_id}, which has ended")
        return scan

    def _take(self, raw: bytes) -> None:
        message = loads(raw)
        kind = message["type"]
        if kind == "start":
            scan = start_record(message, self.channel)
            ident = scan.params["stream_v2"]
            key = (ident["series_id"], ident["series_unique_id"])
            if key in self._series:
                raise MalformedRecord(f"a second start of {scan.scan_id}")
            if self._last is not None and self._last not in self._ended:
                self._ended.add(self._last)
                self.log(f"stream-v2: {scan.scan_id} started before {self._last} ended: closed")
            self._series[key], self._last = scan, scan.scan_id
            self._starts.append(scan)
        elif kind == "image":
            scan = self._known(message)
            index = _uint(message, "image_id")
            if index >= scan.frames:
                raise MalformedRecord(f"image_id {index} outside 0..{scan.frames - 1}")
            if self.rank_input is not None:
                raise MalformedRecord("an image relayed to the driver")
            if scan.scan_id not in self._dropped:
                self._queue.append(StreamV2Image(scan.scan_id, index, raw, time.time()))
        elif kind == "end":
            self._ended.add(self._known(message).scan_id)
        else:
            raise MalformedRecord(f"unknown message type {kind!r}")

    def _skipped(self, scan_id: str) -> None:
        self._drop(scan_id)

    def resume(self, scan: ScanStart) -> None:
        """Makes ``scan`` (saved by an earlier driver) current; its later images are taken."""
        ident = scan.params.get("stream_v2", {})
        with self._lock:
            key = (ident.get("series_id"), ident.get("series_unique_id", ""))
            self._series[key] = scan
            self.scan = scan

    def _drop(self, scan_id: str) -> None:
        self._dropped.add(scan_id)
        self._queue = [m for m in self._queue if m.scan_id != scan_id]

    def _mine(self) -> list[StreamV2Image]:
        current = self.scan.scan_id if self.scan else None
        return [m for m in self._queue if m.scan_id == current]

    def finished(self, scan_id: str) -> None:
        """Drops what is queued, or still comes, for ``scan_id``."""
        with self._lock:
            self._drop(scan_id)

    def route(self, items: list[StreamV2Image], ranks: int) -> list[list]:
        """Work per rank: image ``index`` goes to rank ``index % ranks`` (its owner)."""
        work: list[list] = [[] for _ in range(ranks)]
        for item in items:
            work[item.index % ranks].append(item)
        return work

    def close(self) -> None:
        if self._pull is not None:
            self._pull.close()
