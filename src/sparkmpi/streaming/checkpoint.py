"""The durable state of one scan: ``<scan>/checkpoint/state.json`` and the frames files the ranks
write to ``<scan>/checkpoint/frames/``.

``state.json`` lists only batches whose result file is on disk (written and flushed first), so
whatever it names is durable: the frames files, the frames they hold, the source position to
read on from, and the last result to continue the solver from. A frames file it does not name
(a batch that failed or whose driver died before the state was written) is never read again
and is removed when the scan resumes.
"""

from __future__ import annotations

import json
from pathlib import Path

from sparkmpi.files import atomic_output
from sparkmpi.streaming.protocol import MalformedRecord, ScanStart, decode, encode

EMPTY = {
    "batch": 0,
    "frames_files": [],
    "used": [],
    "dropped_duplicates": 0,
    "malformed": 0,
    "position": {},
    "result": None,
    "recoveries": 0,
}


def unfinished_scans(out_dir: Path, skip: set[str]) -> list[ScanStart]:
    """The scan-start records saved by scans under ``out_dir`` that have no ``final.h5`` (and
    are not in ``skip``), oldest first: a restarted driver resumes them even when the
    transport cannot replay their scan-start (ZeroMQ)."""
    starts = []
    for saved in sorted(Path(out_dir).glob("*/checkpoint/scan-start.json")):
        scan = saved.parent.parent
        if scan.name in skip or (scan / "final.h5").exists():
            continue
        try:
            start = decode(saved.read_bytes(), saved.with_suffix(".bin").read_bytes())
        except (OSError, MalformedRecord):
            continue
        if isinstance(start, ScanStart) and start.scan_id == scan.name:
            starts.append((saved.stat().st_mtime, start))
    return [start for _, start in sorted(starts, key=lambda pair: pair[0])]


class Checkpoint:
    """``state`` is the last durable state (loaded from ``state.json`` when it exists)."""

    def __init__(self, directory: Path):
        self.frames_dir = directory / "checkpoint" / "frames"
        self.frames_dir.mkdir(parents=True, exist_ok=True)
        self.path = directory / "checkpoint" / "state.json"
        self.resumed = self.path.exists()
        self.state = dict(EMPTY)
        if self.resumed:
            self.state.update(json.loads(self.path.read_text()))

    def save_start(self, start: ScanStart) -> None:
        """Keeps the scan-start record beside the state (once)."""
        path = self.path.with_name("scan-start.json")
        if not path.exists():
            header, payload = encode(start)
            with atomic_output(path.with_suffix(".bin")) as tmp:
                tmp.write_bytes(payload)
            with atomic_output(path) as tmp:
                tmp.write_bytes(header)

    def discard_unlisted(self) -> None:
        """Removes frames files that no durable batch lists."""
        listed = {Path(p).name for p in self.state["frames_files"]}
        for path in self.frames_dir.glob("*.npz"):
            if path.name not in listed:
                path.unlink(missing_ok=True)

    def restore_work(self, ranks: int) -> list[list[str]]:
        """The durable frames files dealt out to ``ranks`` ranks (any rank may read any file:
        the frames then go to the rank that owns their index)."""
        work: list[list[str]] = [[] for _ in range(ranks)]
        for i, path in enumerate(self.state["frames_files"]):
            work[i % ranks].append(path)
        return work

    def write(self, **changes) -> None:
        """Applies ``changes`` to the state and writes it durably (call only once the result
        file it names is durable)."""
        self.state.update(changes)
        with atomic_output(self.path) as tmp:
            tmp.write_text(json.dumps(self.state))
