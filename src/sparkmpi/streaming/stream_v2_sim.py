"""A DECTRIS Stream V2 detector simulator: binds a PUSH socket, as a detector's DCU does, and
streams a scan as ``start``, ``image`` and ``end`` CBOR messages, images compressed as the
detector does (bitshuffle + LZ4 or LZ4, HDF5 framing, through hdf5plugin's filters).
App-agnostic: an app supplies its scan-start (carried in the start's
``user_data["sparkmpi"]``), the frames as counts, and its detector fields (e.g.
:func:`sparkmpi.apps.ptycho.streaming.stream_v2_series`).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime

import numpy as np

from sparkmpi.streaming.kafka_transport import StreamError
from sparkmpi.streaming.producer import pace
from sparkmpi.streaming.protocol import ScanStart
from sparkmpi.streaming.stream_v2 import USER_DATA_KEY
from sparkmpi.streaming.stream_v2_cbor import COMPRESSION, DTYPES, TAG_TYPED

CHANNEL = "threshold_1"
MAGIC = 55799  # RFC 8949 self-described CBOR: DECTRIS messages begin with it


class Compressor:
    """Compresses 2-D frames into the HDF5 framing of ``bslz4`` or ``lz4`` (the chunk bytes
    hdf5plugin's filter writes), as tag 56500 carries them."""

    def __init__(self, shape: tuple[int, int], dtype: str, algorithm: str):
        import h5py
        import hdf5plugin

        if algorithm not in COMPRESSION:
            raise ValueError(f"compression must be one of {COMPRESSION} or None")
        self.algorithm = algorithm
        filters = hdf5plugin.Bitshuffle(cname="lz4") if algorithm == "bslz4" else hdf5plugin.LZ4()
        self.file = h5py.File(f"sv2-{uuid.uuid4().hex}", "w", driver="core", backing_store=False)
        self.dataset = self.file.create_dataset(
            "frame", shape=shape, dtype=dtype, chunks=shape, **filters
        )

    def __call__(self, frame: np.ndarray) -> bytes:
        self.dataset[...] = frame
        _, chunk = self.dataset.id.read_direct_chunk((0, 0))
        return bytes(chunk)

    def close(self) -> None:
        self.file.close()


def counts(frame: np.ndarray, dtype: str) -> np.ndarray:
    """``frame`` as detector counts: rounded, clipped to ``dtype``'s range, little-endian."""
    top = np.iinfo(dtype).max
    return np.clip(np.rint(frame), 0, top).astype(np.dtype(dtype).newbyteorder("<"))


def image_array(frame: np.ndarray, compress: Compressor | None):
    """``frame`` (counts) as an RFC 8746 row-major multi-dimensional array, its typed array
    content compressed with ``compress`` (tag 56500) when given."""
    from cbor2 import CBORTag

    tag = TAG_TYPED[np.dtype(frame.dtype).newbyteorder("<").str]
    raw = np.ascontiguousarray(frame).tobytes()
    if compress is not None:
        elem_size = frame.dtype.itemsize if compress.algorithm == "bslz4" else 0  # spec: lz4 0
        content = CBORTag(56500, [compress.algorithm, elem_size, compress(frame)])
    else:
        content = raw
    return CBORTag(40, [list(frame.shape), CBORTag(tag, content)])


def messages(
    start: ScanStart,
    frames: Sequence[np.ndarray],
    series_id: int,
    dtype: str = "uint16",
    compression: str | None = "bslz4",
    unique_id: str | None = None,
    detector: Mapping | None = None,
) -> Iterator[bytes]:
    """The encoded ``start``, ``image`` (one per frame, as ``dtype`` counts) and ``end``
    messages of series ``series_id``; the start's ``user_data["sparkmpi"]`` holds ``start``'s
    params and payload, and ``detector``'s fields (e.g. ``incident_energy``) are added to it."""
    import cbor2

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, not {dtype!r}")
    unique_id = unique_id or uuid.uuid4().hex
    rows, cols = start.shape
    ident = {"series_id": series_id, "series_unique_id": unique_id}
    arm = datetime.now(UTC)
    head = {
        "type": "start",
        **ident,
        "arm_date": arm,
        "beam_center_x": cols / 2,
        "beam_center_y": rows / 2,
        "channels": [CHANNEL],
        "count_time": 0.001,
        "frame_time": 0.001,
        "detector_description": "spark-mpi Stream V2 simulator",
        "image_dtype": dtype,
        "image_size_x": cols,
        "image_size_y": rows,
        "number_of_images": len(frames),
        "saturation_value": int(np.iinfo(dtype).max) - 1,
        **(detector or {}),
        "user_data": {USER_DATA_KEY: {"params": start.params, "payload": start.data}},
    }
    yield cbor2.dumps(cbor2.CBORTag(MAGIC, head))
    compress = Compressor(start.shape, dtype, compression) if compression else None
    try:
        for index, frame in enumerate(frames):
            image = {
                "type": "image",
                **ident,
                "image_id": index,
                "series_date": arm,
                "start_time": [index, 1000],
                "stop_time": [index + 1, 1000],
                "real_time": [1, 1000],
                "data": {CHANNEL: image_array(counts(frame, dtype), compress)},
            }
            yield cbor2.dumps(cbor2.CBORTag(MAGIC, image))
    finally:
        if compress is not None:
            compress.close()
    yield cbor2.dumps(cbor2.CBORTag(MAGIC, {"type": "end", **ident}))


def _endpoint(url_or_host_port: str) -> str:
    text = url_or_host_port.partition("?")[0]  # ?clients= concerns the receiving side
    for prefix in ("stream-v2://", "tcp://"):
        text = text.removeprefix(prefix)
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise StreamError(f"{url_or_host_port}: give stream-v2://HOST:PORT or HOST:PORT")
    return f"tcp://{host}:{port}"


def produce_stream_v2(
    start: ScanStart,
    frames: Sequence[np.ndarray],
    url_or_host_port: str,
    rate_hz: float,
    series_id: int = 1,
    dtype: str = "uint16",
    compression: str | None = "bslz4",
    log=None,
    client_timeout: float = 60.0,
    detector: Mapping | None = None,
) -> dict:
    """Binds a PUSH socket at ``url_or_host_port`` (the detector's side), waits up to
    ``client_timeout`` s for a client, then sends :func:`messages` of series ``series_id``:
    the start, one image every 1/``rate_hz`` s (0: as fast as possible), the end; returns the
    scan id the source will give it, the images sent and the times of the first and last.
    Everything sent reaches a connected client before it returns (or 30 s pass)."""
    import zmq

    from sparkmpi.streaming.stream_v2 import scan_id_of

    unique_id = uuid.uuid4().hex
    context = zmq.Context()
    socket = context.socket(zmq.PUSH)
    socket.setsockopt(zmq.SNDHWM, 100_000)
    first = last = 0.0
    sent = 0
    try:
        socket.bind(_endpoint(url_or_host_port))
        if not socket.poll(int(client_timeout * 1000), zmq.POLLOUT):
            raise StreamError(f"{url_or_host_port}: no client connected in {client_timeout} s")
        begin = time.monotonic()
        stream = messages(start, frames, series_id, dtype, compression, unique_id, detector)
        socket.send(next(stream))
        for message in stream:
            if sent < len(frames):
                pace(begin, sent, rate_hz)
                last = time.time()
                first = first or last
                sent += 1
                if log is not None and sent % 64 == 0:
                    log(f"sent {sent}/{len(frames)} images")
            socket.send(message, copy=False)
    finally:
        socket.close(linger=30_000)
        context.term()
    scan_id = scan_id_of(series_id, unique_id)
    return {"scan_id": scan_id, "frames": sent, "first": first, "last": last}
