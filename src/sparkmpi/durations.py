"""Durations as people type them on a command line: ``2s``, ``500ms``, ``1.5`` (seconds)."""

from __future__ import annotations

import argparse


def duration(text: str) -> float:
    """Seconds in ``text`` (``2s``, ``500ms``, ``1m`` or a plain number of seconds), for
    argparse's ``type=``; anything else, zero or less raises ArgumentTypeError naming it."""
    raw = text.strip().lower()
    scales = (("ms", 1e-3), ("s", 1.0), ("m", 60.0))
    scale, number = next(((f, raw[: -len(u)]) for u, f in scales if raw.endswith(u)), (1.0, raw))
    try:
        value = float(number) * scale
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive duration like 2s or 500ms")
    return value
