"""What a rank does with one micro-batch: read its share of the batch (Kafka offset ranges
straight from the broker, ZeroMQ frames shipped by the driver, or checkpointed frames after a
restart), drop what it has already seen, make the new frames durable, and let the app iterate.
"""

from __future__ import annotations

import importlib
import os

import numpy as np

from sparkmpi.streaming.protocol import Frame, MalformedRecord, ScanStart, decode

APPS = {"ptycho": "sparkmpi.apps.ptycho.streaming:PtychoStream"}
_states: dict[tuple[str, str], object] = {}


def app_class(name: str):
    """The streaming app called ``name`` (see :data:`APPS`)."""
    if name not in APPS:
        raise ValueError(f"app must be one of {', '.join(APPS)}, not {name!r}")
    module, cls = APPS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def _materialize(work, scan: ScanStart):
    """Frames in this rank's work, malformed-record reports, and Kafka offsets reached."""
    from sparkmpi.streaming.kafka_transport import KafkaRange, read_range

    frames, malformed, reached, restored = [], [], {}, []
    for item in work:
        if isinstance(item, KafkaRange):
            raw, reached[item.partition] = read_range(item)
        elif isinstance(item, str):  # a checkpointed frames file
            with np.load(item) as saved:
                restored += [
                    Frame(scan.scan_id, int(i), d, 0.0)
                    for i, d in zip(saved["index"], saved["data"], strict=True)
                ]
            continue
        else:
            raw = [item]
        for header, payload in raw:
            try:
                record = decode(header, payload, scan)
            except MalformedRecord as exc:
                malformed.append(str(exc))
                continue
            if isinstance(record, Frame):
                frames.append(record)
    return frames, malformed, reached, restored


def _save(frames: list[Frame], path: str) -> None:
    from sparkmpi.files import atomic_output

    with atomic_output(path) as tmp:
        np.savez(
            tmp,
            index=np.array([f.index for f in frames], dtype=np.int64),
            data=np.stack([f.data for f in frames]),
        )


def rank_step(app: str, scan: ScanStart, settings, step: dict, comm, work):
    """Runs one batch on this rank; returns what the driver needs to account for it (and, on
    rank 0, the app's result)."""
    key = (app, scan.scan_id)
    state = _states.get(key)
    if state is None:
        _states.clear()  # one scan at a time per session
        state = _states[key] = app_class(app)(scan, settings, comm)
    frames, malformed, reached, restored = _materialize(work or [], scan)
    state.add(restored)
    new, duplicates = state.add(frames)
    frames_file = None
    if new and step.get("frames_dir"):
        frames_file = os.path.join(step["frames_dir"], f"b{step['batch']:06d}-r{comm.rank}.npz")
        _save(new, frames_file)
    result = state.iterate(step["iterations"])
    return {
        "new": [f.index for f in new],
        "newest_produced": max((f.produced for f in new), default=None),
        "duplicates": duplicates,
        "malformed": malformed,
        "reached": reached,
        "frames_file": frames_file,
        "result": result if comm.rank == 0 else None,
    }
