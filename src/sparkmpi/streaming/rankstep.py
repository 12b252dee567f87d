"""What a rank does with one micro-batch: read its share of the batch (Kafka offset ranges
straight from the broker, ZeroMQ frames shipped by the driver, or checkpointed frames after a
restart), send every frame to the rank that owns its index (``index % ranks``, whatever the
transport or the rank count of an earlier session), drop what the owner already holds, make
the new frames durable, hand them to the app once, count what it was given, and iterate.
"""

from __future__ import annotations

import json
import os
import threading
import time

import numpy as np

from sparkmpi.streaming.app import app_class
from sparkmpi.streaming.protocol import Frame, MalformedRecord, ScanStart, decode
from sparkmpi.streaming.stream_v2_ranks import take_control, take_images

FAULTS_ENV = "SPARKMPI_STREAM_FAULTS"


class _Share:
    """One rank's share of one scan: the app's state, the frame indices given to it and how
    many times each was given (more than once would be a bug, which the driver reports)."""

    def __init__(self, app: str, scan: ScanStart, settings, comm, restore: str | None):
        self.app = app_class(app)(scan, settings, comm)
        if restore:
            self.app.restore(_read_result(restore))
        self.applied: dict[int, int] = {}

    def apply(self, frames: list[Frame]) -> tuple[list[Frame], int]:
        """Gives the app the frames it does not hold yet; returns them and how many were
        duplicates."""
        new, duplicates, batch = [], 0, set()
        for frame in frames:
            if frame.index in self.applied or frame.index in batch:
                duplicates += 1
            else:
                batch.add(frame.index)
                new.append(frame)
        if new:
            self.app.add(new)
            for frame in new:
                self.applied[frame.index] = self.applied.get(frame.index, 0) + 1
        return new, duplicates


_shares: dict[tuple[str, str], _Share] = {}


def _read_result(path: str) -> dict:
    import h5py

    with h5py.File(path) as f:
        return {key: f[key][()] for key in f}


def _materialize(work, scan: ScanStart):
    """Frames read from this rank's work (Kafka ranges, shipped records, a source's messages
    with a ``frames(scan)`` method), checkpointed frames, malformed-record reports, and the
    Kafka offsets reached."""
    from sparkmpi.streaming.kafka_transport import KafkaRange, read_range

    frames, malformed, reached, restored = [], [], {}, []
    for item in work:
        if isinstance(item, KafkaRange):
            raw, reached[item.partition] = read_range(item)
        elif hasattr(item, "frames"):  # a source's own message, decoded here on the rank
            try:
                frames += item.frames(scan)
            except MalformedRecord as exc:
                malformed.append(str(exc))
            continue
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


def _to_owners(comm, frames: list[Frame]) -> list[Frame]:
    """Exchanges frames so each lands on rank ``index % size`` (collective)."""
    if comm.size == 1:
        return frames
    outgoing: list[list[Frame]] = [[] for _ in range(comm.size)]
    for frame in frames:
        outgoing[frame.index % comm.size].append(frame)
    own, outgoing[comm.rank] = outgoing[comm.rank], []  # not pickled to itself
    incoming = comm.alltoall(outgoing)
    incoming[comm.rank] = own
    return [frame for part in incoming for frame in part]


def _save(frames: list[Frame], path: str) -> None:
    from sparkmpi.files import atomic_output

    with atomic_output(path) as tmp:
        np.savez(
            tmp,
            index=np.array([frame.index for frame in frames], dtype=np.int64),
            data=np.stack([frame.data for frame in frames]),
        )


def fault_point(scan_id: str, batch: int, rank: int) -> None:
    """The fault-injection hook of tests and ``bench stream --faults``: when ``$SPARKMPI_STREAM_
    FAULTS`` names a directory holding ``<scan id>.request`` (JSON ``{"rank": R}``) and no
    ``<scan id>.fired`` yet, rank R writes ``<scan id>.fired`` (its PID, the batch, the time)
    in the middle of its next batch (frames read and durable, before iterating) and then
    stops there until it is killed, so the harness decides, after the fact, whether it was
    killed mid-batch or hung. Without the variable it does nothing."""
    directory = os.environ.get(FAULTS_ENV)
    if not directory:
        return
    request = os.path.join(directory, f"{scan_id}.request")
    try:
        with open(request) as f:
            wanted = json.load(f).get("rank")
    except (OSError, ValueError):
        return
    if wanted != rank:
        return
    try:
        fd = os.open(
            os.path.join(directory, f"{scan_id}.fired"), os.O_CREAT | os.O_EXCL | os.O_WRONLY
        )
    except FileExistsError:
        return
    with os.fdopen(fd, "w") as f:
        json.dump({"pid": os.getpid(), "batch": batch, "time": time.time()}, f)
    threading.Event().wait()


def rank_step(app: str, scan: ScanStart, settings, step: dict, comm, work):
    """Runs one batch on this rank; returns what the driver needs to account for it (and, on
    rank 0, the app's result)."""
    key = (app, scan.scan_id)
    share = _shares.get(key)
    if share is None:
        _shares.clear()  # one scan at a time per session
        share = _shares[key] = _Share(app, scan, settings, comm, step.get("restore"))
    local = take_images(scan.scan_id)  # read by this rank from the detector itself
    frames, malformed, reached, restored = _materialize([*(work or []), *local], scan)
    restored = _to_owners(comm, restored)
    share.apply(restored)
    new, duplicates = share.apply(_to_owners(comm, frames))
    control, rejected = take_control()
    idle = step.get("skip_idle") and comm.allreduce(len(new) + len(restored)) == 0
    frames_file = None
    if new and step.get("frames_dir"):
        frames_file = os.path.join(step["frames_dir"], f"b{step['batch']:06d}-r{comm.rank}.npz")
        _save(new, frames_file)
    fault_point(scan.scan_id, step["batch"], comm.rank)
    result = None if idle else share.app.iterate(step["iterations"])
    return {
        "new": [f.index for f in new],
        "restored": len(restored),
        "applied": (list(share.applied), list(share.applied.values())),
        "newest_produced": max((f.produced for f in new), default=None),
        "duplicates": duplicates,
        "malformed": malformed + rejected,
        "control": control,
        "reached": reached,
        "frames_file": frames_file,
        "result": result if comm.rank == 0 else None,  # None on rank 0: an idle batch
    }
