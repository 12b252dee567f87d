"""Bluesky run documents (start, descriptor, resource, datum, event, stop and their pages)
turned into the pipeline's scans and work items; docs/streaming-bluesky.md describes the
``sparkmpi`` start-document metadata this relies on.

The start document's ``sparkmpi`` block gives the app's scan-start fields (planned positions in
object pixels, geometry, probe); the primary descriptor gives the frame shape. Each primary
event becomes one work item for the rank that owns its index (``seq_num - 1``): an encoded
frame when the image is inline, a :class:`DatumFrame` (read on the rank) when it is a datum
reference, or a :class:`Rejected` item when the event is wrong (the rank reports it as
malformed). A document that belongs to no run being followed is logged and skipped.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np

from sparkmpi.streaming.protocol import Frame, MalformedRecord, ScanStart, check_scan_id, encode

TOLERANCE_PX = 0.5


def scan_id_of(start_uid: str) -> str:
    """The pipeline's scan id of the run whose start document has uid ``start_uid``."""
    return check_scan_id(f"bluesky-{str(start_uid)[:12]}")


@dataclass(frozen=True)
class Rejected:
    """A work item for an event that cannot be used: the rank reports ``reason``."""

    index: int
    reason: str

    def frames(self, scan: ScanStart) -> list[Frame]:
        raise MalformedRecord(self.reason)


def confined(path: str, roots: tuple[str, ...], what: str) -> str:
    """``path`` resolved (symlinks followed) if it lies inside one of ``roots`` (the
    ``--data-root`` directories); :class:`MalformedRecord` otherwise: a document from the
    network never makes the pipeline read a file elsewhere."""
    if not roots:
        raise MalformedRecord(f"{what} {path!r} is a file, and no --data-root allows files")
    resolved = os.path.realpath(path)
    if not any(resolved.startswith(root.rstrip(os.sep) + os.sep) for root in roots):
        raise MalformedRecord(f"{what} {path!r} is not inside a --data-root")
    return resolved


@dataclass(frozen=True)
class DatumFrame:
    """Frame ``index`` stored in a file (a resource plus a datum); read by the rank that owns
    it. Specs: ``NPY_SEQ`` (ophyd.sim) and ``AD_HDF5`` (area detector, one frame per point)."""

    index: int
    produced: float
    spec: str
    path: str
    resource_kwargs: dict
    datum_kwargs: dict
    data_roots: tuple[str, ...] = ()

    def _read(self) -> np.ndarray:
        if self.spec == "NPY_SEQ":
            name = f"{self.path}_{int(self.datum_kwargs['index'])}.npy"
            return np.load(confined(name, self.data_roots, "datum file"), allow_pickle=False)
        if self.spec == "AD_HDF5":
            import h5py

            per_point = int(self.resource_kwargs.get("frame_per_point", 1))
            if per_point != 1:
                raise MalformedRecord(
                    f"frame {self.index}: AD_HDF5 with frame_per_point={per_point} "
                    "(only 1 is supported)"
                )
            with h5py.File(confined(self.path, self.data_roots, "resource file"), "r") as f:
                return f["entry/data/data"][int(self.datum_kwargs["point_number"])]
        raise MalformedRecord(f"frame {self.index}: resource spec {self.spec!r} is not supported")

    def frames(self, scan: ScanStart) -> list[Frame]:
        """The frame read from its file, as ``scan.dtype``; :class:`MalformedRecord` (one
        line) if the file is missing or unreadable or the image is not ``scan.shape``."""
        try:
            data = np.asarray(self._read())
        except MalformedRecord:
            raise
        except (OSError, KeyError, ValueError, TypeError, IndexError) as exc:
            why = " ".join(str(exc).split())[:200]
            raise MalformedRecord(
                f"frame {self.index}: cannot read {self.spec} data at {self.path} "
                f"({type(exc).__name__}: {why})"
            ) from None
        return [_frame(scan, self.index, data, self.produced)]


def _frame(scan: ScanStart, index: int, data: np.ndarray, produced: float) -> Frame:
    data = np.squeeze(np.asarray(data))
    if data.shape != tuple(scan.shape):
        raise MalformedRecord(
            f"frame {index}: image of shape {data.shape}, the scan's is {scan.shape}"
        )
    if data.dtype.kind not in "fiu":
        raise MalformedRecord(f"frame {index}: image of dtype {data.dtype} is not numbers")
    return Frame(scan.scan_id, index, np.ascontiguousarray(data, dtype=scan.dtype), produced)


def _probe(value, shape: tuple[int, int], roots: tuple[str, ...]) -> bytes:
    if isinstance(value, str):
        probe = np.load(confined(value, roots, "sparkmpi.probe"), allow_pickle=False)
    else:
        pairs = np.asarray(value, dtype=np.float64)
        if pairs.ndim != 3 or pairs.shape[-1] != 2:
            raise MalformedRecord("sparkmpi.probe is not rows of [re, im] pairs nor an .npy path")
        probe = pairs[..., 0] + 1j * pairs[..., 1]
    if probe.shape != tuple(shape):
        raise MalformedRecord(f"sparkmpi.probe is {probe.shape}, the frames are {tuple(shape)}")
    return np.ascontiguousarray(probe, dtype=np.complex64).tobytes()


def _planned(start: dict, md: dict, fields: list[str]) -> np.ndarray:
    """Planned motor positions (frames, 2) in motor units: ``sparkmpi.positions``, or a
    ``list_scan``'s lists of the ``position_fields`` motors."""
    if "positions" in md:
        planned = md["positions"]
    elif start.get("plan_name") == "list_scan":
        args, motors = start.get("plan_args", {}).get("args", []), start.get("motors", [])
        lists = dict(zip(motors, args[1::2], strict=False))
        if any(f not in lists for f in fields):
            raise MalformedRecord(f"list_scan motors {motors} lack {fields}")
        planned = np.column_stack([lists[f] for f in fields])
    else:
        raise MalformedRecord("no sparkmpi.positions and not a list_scan")
    planned = np.asarray(planned, dtype=np.float64)
    if planned.ndim != 2 or planned.shape[1] != 2 or not np.isfinite(planned).all():
        raise MalformedRecord(
            f"planned positions of shape {planned.shape}: not (frames, 2) numbers"
        )
    return planned


@dataclass
class Run:
    """One followed run: its scan (once its primary descriptor is seen), the planned motor
    positions, its work items not yet processed, and where its documents are in Kafka."""

    uid: str
    scan_id: str
    start: dict
    planned: np.ndarray
    scale: np.ndarray
    origin: np.ndarray
    fields: list[str]
    image_field: str | None
    tolerance: float
    scan: ScanStart | None = None
    primary: str | None = None
    pending: list = field(default_factory=list)  # (partition, offset, index, item)
    ended: bool = False
    finished: bool = False
    first: dict[int, int] = field(default_factory=dict)  # first document offset per partition
    handed: dict[int, int] = field(default_factory=dict)  # next offset past processed items
    skip_below: dict[int, int] = field(default_factory=dict)

    def pixels(self) -> np.ndarray:
        return (self.planned - self.origin) / self.scale


def _run(start: dict, md: dict) -> Run:
    if md.get("app", "ptycho") != "ptycho":
        raise MalformedRecord(f"sparkmpi.app {md.get('app')!r} is not supported (only ptycho)")
    fields = list(md.get("position_fields", []))
    if len(fields) != 2 or not all(isinstance(f, str) for f in fields):
        raise MalformedRecord("sparkmpi.position_fields must name two fields, [row, col]")
    scale = np.broadcast_to(np.asarray(md.get("units_per_pixel", 0), dtype=np.float64), (2,))
    if not np.isfinite(scale).all() or (scale <= 0).any():
        raise MalformedRecord("sparkmpi.units_per_pixel must be a positive number (or two)")
    origin = np.broadcast_to(np.asarray(md.get("origin", 0.0), dtype=np.float64), (2,))
    planned = _planned(start, md, fields)
    if len(planned) != start.get("num_points", len(planned)):
        raise MalformedRecord(f"{len(planned)} planned positions, num_points {start['num_points']}")
    return Run(
        uid=str(start["uid"]),
        scan_id=scan_id_of(start["uid"]),
        start=start,
        planned=planned,
        scale=scale.copy(),
        origin=origin.copy(),
        fields=fields,
        image_field=md.get("image_field"),
        tolerance=float(md.get("tolerance_px", TOLERANCE_PX)),
    )


class Translator:
    """Follows runs through their documents; :meth:`feed` takes one (name, doc) with its Kafka
    partition and offset. Runs are kept by scan id in start order."""

    def __init__(self, log=print, data_roots: tuple[str, ...] = ()):
        self.log = log
        self.data_roots = tuple(data_roots)
        self.runs: dict[str, Run] = {}
        self._by_uid: dict[str, Run | None] = {}  # None: a run not followed
        self._descriptors: dict[str, Run | None] = {}
        self._resources: dict[str, tuple[Run | None, dict]] = {}
        self._datums: dict[str, tuple[dict, dict]] = {}  # datum id -> (resource, datum_kwargs)

    def feed(self, partition: int, offset: int, name: str, doc: dict) -> None:
        """Applies one document; a wrong one is logged (or, inside a followed run's primary
        stream, queued as a :class:`Rejected` item) and skipped, never raised."""
        try:
            if not isinstance(doc, dict):
                raise MalformedRecord(f"{name!r} document is a {type(doc).__name__}, not a map")
            handler = getattr(self, f"_on_{name}", None)
            if handler is None:
                return  # e.g. stream_resource: not used
            handler(partition, offset, doc)
        except MalformedRecord as exc:
            self.log(f"skipped a bluesky {name} document: {exc}")
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            self.log(f"skipped a bluesky {name} document: {type(exc).__name__}: {exc}")

    def _note(self, run: Run | None, partition: int, offset: int) -> None:
        if run is not None:
            run.first.setdefault(partition, offset)

    def _on_start(self, partition: int, offset: int, doc: dict) -> None:
        uid = str(doc["uid"])
        if uid in self._by_uid:
            return
        md = doc.get("sparkmpi")
        if not isinstance(md, dict):
            self._by_uid[uid] = None
            self.log(f"bluesky run {uid[:12]} has no sparkmpi metadata: not followed")
            return
        try:
            run = _run(doc, md)
        except MalformedRecord as exc:
            self._by_uid[uid] = None
            raise MalformedRecord(f"run {uid[:12]}: {exc}") from None
        self._by_uid[uid] = run
        self.runs[run.scan_id] = run
        self._note(run, partition, offset)

    def _run_of(self, uid: object, what: str) -> Run | None:
        if uid not in self._by_uid:
            raise MalformedRecord(f"{what} of unknown run {str(uid)[:12]} (no start document seen)")
        return self._by_uid[uid]

    def _on_descriptor(self, partition: int, offset: int, doc: dict) -> None:
        run = self._run_of(doc.get("run_start"), "descriptor")
        self._descriptors[str(doc["uid"])] = run
        stream = run.start["sparkmpi"].get("stream", "primary") if run else None
        if run is None or doc.get("name", "primary") != stream or run.primary is not None:
            return
        self._note(run, partition, offset)
        keys = doc["data_keys"]
        images = [k for k, v in keys.items() if len(v.get("shape") or []) >= 2]
        name = run.image_field or (images[0] if len(images) == 1 else None)
        missing = [f for f in [name, *run.fields] if f not in keys]
        if name is None or missing:
            del self.runs[run.scan_id]
            self._by_uid[run.uid] = None
            raise MalformedRecord(
                f"run {run.uid[:12]}: its {stream} stream has no image field {missing or images}"
            )
        shape = tuple(int(v) for v in keys[name]["shape"] if int(v) != 1)[-2:]
        md = run.start["sparkmpi"]
        frames = int(run.start.get("num_points", len(run.planned)))
        run.image_field, run.primary = name, str(doc["uid"])
        run.scan = ScanStart(
            run.scan_id,
            frames,
            shape,
            str(md.get("dtype", "float32")),
            {"positions": run.pixels().tolist(), "geometry": md.get("geometry")},
            _probe(md.get("probe"), shape, self.data_roots),
        )

    def _on_resource(self, partition: int, offset: int, doc: dict) -> None:
        run = self._run_of(doc.get("run_start"), "resource")
        self._note(run, partition, offset)
        self._resources[str(doc["uid"])] = (run, doc)

    def _on_datum(self, partition: int, offset: int, doc: dict) -> None:
        resource = self._resources.get(doc.get("resource"))
        if resource is None:
            raise MalformedRecord(f"datum {doc.get('datum_id')!r} of unknown resource")
        if resource[0] is not None:
            self._datums[str(doc["datum_id"])] = (resource[1], dict(doc.get("datum_kwargs", {})))

    def _on_datum_page(self, partition: int, offset: int, doc: dict) -> None:
        kwargs = doc.get("datum_kwargs", {})
        for i, datum_id in enumerate(doc["datum_id"]):
            single = {k: v[i] for k, v in kwargs.items()}
            self._on_datum(
                partition,
                offset,
                {"resource": doc["resource"], "datum_id": datum_id, "datum_kwargs": single},
            )

    def _on_event(self, partition: int, offset: int, doc: dict) -> None:
        descriptor = doc.get("descriptor")
        if descriptor not in self._descriptors:
            raise MalformedRecord(f"event of unknown descriptor {str(descriptor)[:12]}")
        run = self._descriptors[descriptor]
        if run is None or run.finished or descriptor != run.primary:
            return
        if offset < run.skip_below.get(partition, 0):
            return
        index = int(doc["seq_num"]) - 1
        item = self._item(run, index, doc)
        run.pending.append((partition, offset, index if index >= 0 else 0, item))

    def _on_event_page(self, partition: int, offset: int, doc: dict) -> None:
        data, filled = doc.get("data", {}), doc.get("filled", {})
        for i, seq_num in enumerate(doc["seq_num"]):
            self._on_event(
                partition,
                offset,
                {
                    "descriptor": doc["descriptor"],
                    "seq_num": seq_num,
                    "time": doc["time"][i],
                    "data": {k: v[i] for k, v in data.items()},
                    "filled": {k: v[i] for k, v in filled.items()},
                },
            )

    def _item(self, run: Run, index: int, doc: dict):
        scan = run.scan
        if not 0 <= index < scan.frames:
            return Rejected(0, f"event seq_num {index + 1} outside 1..{scan.frames}")
        data = doc.get("data", {})
        for k, name in enumerate(run.fields):
            value = data.get(name)
            if not isinstance(value, int | float) or isinstance(value, bool):
                return Rejected(index, f"frame {index}: no {name} reading")
            off = abs(value - run.planned[index, k]) / run.scale[k]
            if not off <= run.tolerance:
                return Rejected(
                    index,
                    f"frame {index}: {name} readback {value:g} is {off:.3g} pixels from its "
                    f"planned {run.planned[index, k]:g}",
                )
        image = data.get(run.image_field)
        produced = float(doc.get("time", time.time()))
        if isinstance(image, str):
            datum = self._datums.get(image)
            if datum is None:
                return Rejected(index, f"frame {index}: datum {image!r} unknown")
            resource, kwargs = datum
            path = os.path.join(str(resource.get("root", "")), str(resource["resource_path"]))
            try:
                path = confined(path, self.data_roots, "resource")
            except MalformedRecord as exc:
                return Rejected(index, f"frame {index}: {exc}")
            return DatumFrame(
                index,
                produced,
                str(resource.get("spec")),
                path,
                dict(resource.get("resource_kwargs", {})),
                kwargs,
                self.data_roots,
            )
        try:
            return encode(_frame(scan, index, np.asarray(image), produced))
        except MalformedRecord as exc:
            return Rejected(index, str(exc))
        except (TypeError, ValueError) as exc:
            return Rejected(index, f"frame {index}: image not an array ({exc})")

    def _on_stop(self, partition: int, offset: int, doc: dict) -> None:
        run = self._run_of(doc.get("run_start"), "stop")
        if run is None:
            return
        run.ended = True
        if run.scan is None and not run.finished:
            self.forget(run)
            raise MalformedRecord(f"run {run.uid[:12]} stopped before its primary descriptor")

    def forget(self, run: Run) -> None:
        """Drops what ``run`` holds (its items, resources and datums): it is finished, its
        later documents are ignored."""
        run.finished, run.pending = True, []
        self.runs.pop(run.scan_id, None)
        resources = {u for u, (r, _) in self._resources.items() if r is run}
        for uid in resources:
            del self._resources[uid]
        self._datums = {d: v for d, v in self._datums.items() if v[0].get("uid") not in resources}
