"""Replays a scan as a detector would stream it: scan-start, one frame every 1/rate seconds,
scan-end. App-agnostic: the app makes the scan-start record (e.g.
:func:`sparkmpi.apps.ptycho.streaming.produce`)."""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from sparkmpi.streaming.endpoints import open_sink
from sparkmpi.streaming.protocol import Frame, ScanEnd, ScanStart


def pace(begin: float, index: int, rate_hz: float) -> None:
    """Sleeps until frame ``index`` is due at ``rate_hz`` frames per second from ``begin``
    (a :func:`time.monotonic` time); at once for rate 0 or a frame already late."""
    if rate_hz > 0:
        delay = begin + index / rate_hz - time.monotonic()
        if delay > 0:
            time.sleep(delay)


def replay(
    start: ScanStart,
    frames: Sequence[np.ndarray],
    url: str,
    rate_hz: float,
    log=None,
    access=None,
) -> dict:
    """Streams ``start``, then ``frames`` at ``rate_hz`` frames per second (0: as fast as
    possible), then the scan-end, to ``url``; returns the scan id, frames sent and the times
    of the first and last frame."""
    sink = open_sink(url, access=access)
    try:
        sink.send(start)
        begin = time.monotonic()
        first = last = 0.0
        for index, frame in enumerate(frames):
            pace(begin, index, rate_hz)
            last = time.time()
            first = first or last
            sink.send(Frame(start.scan_id, index, frame, last))
            if log is not None and (index + 1) % 64 == 0:
                log(f"sent {index + 1}/{len(frames)} frames")
        sink.send(ScanEnd(start.scan_id, time.time()))
    finally:
        sink.close()
    return {"scan_id": start.scan_id, "frames": len(frames), "first": first, "last": last}
