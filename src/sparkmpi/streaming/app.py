"""What the streaming layer needs from an app, and the registry of streaming apps.

``streaming/`` knows records, batches, offsets and checkpoints; it hands each rank the frames
it owns, exactly once, and asks the app to refine. An app (ptychography now, tomography next)
supplies what its scan-start record carries (``check_start``), how one rank holds its share of
a scan (``add``), how all ranks refine it together (``iterate``, collective), and how a new
session continues from the last durable result (``restore``).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Protocol

from sparkmpi.streaming.protocol import Frame, ScanStart

APPS = {
    "ptycho": "sparkmpi.apps.ptycho.streaming:PtychoStream",
    "tomo": "sparkmpi.apps.tomo.streaming:TomoStream",
}


class StreamingApp(Protocol):
    """One rank's share of one scan, inside a persistent MPI session."""

    #: False if :meth:`iterate`'s result is a function of the frames given alone (a direct
    #: method such as filtered back-projection): the last batch's result is then the final one.
    iterative: bool = True

    def __init__(self, scan: ScanStart, settings: Any, comm: Any) -> None:
        """Empty state for ``scan`` (already accepted by :meth:`check_start`)."""

    @staticmethod
    def check_start(scan: ScanStart) -> None:
        """Raises :class:`~sparkmpi.streaming.protocol.MalformedRecord` (one line) if the
        app's fields of ``scan`` (``scan.params``, ``scan.data``) are missing, inconsistent
        or implausible; such a scan is skipped."""

    def add(self, frames: list[Frame]) -> None:
        """Adds frames this rank has never been given (local, not collective)."""

    def iterate(self, iterations: int) -> dict[str, Any]:
        """Refines with every rank's frames (collective); the result (numpy arrays and an
        ``errors`` list) on rank 0 at least."""

    def restore(self, result: dict[str, Any]) -> None:
        """Continues from ``result``, a result :meth:`iterate` returned before (read back from
        the last durable batch file), before any frame is added."""

    @staticmethod
    def picture(result: dict[str, Any], path: Path, title: str = "") -> None:
        """Writes a PNG of ``result``."""


def app_class(name: str) -> type[StreamingApp]:
    """The streaming app called ``name`` (see :data:`APPS`); ValueError naming the choices."""
    if name not in APPS:
        raise ValueError(f"app must be one of {', '.join(APPS)}, not {name!r}")
    module, cls = APPS[name].split(":")
    return getattr(importlib.import_module(module), cls)
