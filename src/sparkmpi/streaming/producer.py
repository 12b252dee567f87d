"""Replays a ptychographic scan as a detector would stream it: scan-start, one frame every
1/rate seconds, scan-end."""

from __future__ import annotations

import time
import uuid

from sparkmpi.streaming.endpoints import open_sink
from sparkmpi.streaming.protocol import Frame, ScanEnd, ScanStart, check_scan_id


def scan_start(scan, scan_id: str) -> ScanStart:
    """The scan-start record of a :class:`~sparkmpi.apps.ptycho.scan.Scan`."""
    return ScanStart(
        scan_id,
        len(scan.intensities),
        tuple(scan.intensities.shape[1:]),
        str(scan.intensities.dtype),
        scan.positions,
        scan.probe,
        {
            "energy_ev": scan.energy_ev,
            "distance_m": scan.distance_m,
            "pixel_size_m": scan.pixel_size_m,
        },
    )


def produce(scan, url: str, rate_hz: float, scan_id: str | None = None, log=None) -> dict:
    """Streams ``scan`` to ``url`` at ``rate_hz`` frames per second (0: as fast as possible);
    returns the scan id, frames sent and the times of the first and last frame."""
    scan_id = check_scan_id(scan_id or uuid.uuid4().hex[:12])  # refused before anything is sent
    sink = open_sink(url)
    try:
        sink.send(scan_start(scan, scan_id))
        start = time.monotonic()
        first = last = 0.0
        for index, frame in enumerate(scan.intensities):
            if rate_hz > 0:
                delay = start + index / rate_hz - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            last = time.time()
            first = first or last
            sink.send(Frame(scan_id, index, frame, last))
            if log is not None and (index + 1) % 64 == 0:
                log(f"sent {index + 1}/{len(scan.intensities)} frames")
        sink.send(ScanEnd(scan_id, time.time()))
    finally:
        sink.close()
    return {"scan_id": scan_id, "frames": len(scan.intensities), "first": first, "last": last}
