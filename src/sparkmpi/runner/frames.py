"""Framed messages between driver, Spark task and rank process.

A frame is ``kind`` + a pickle (protocol 5) + its out-of-band buffers, so large numpy arrays
travel as raw bytes without being copied into the pickle. The task relays frames between the
driver and its rank without unpickling them (:class:`Parts`).
"""

from __future__ import annotations

import pickle
import socket
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # asyncio is only needed by the driver; rank processes must start fast
    import asyncio

_HEADER = struct.Struct("!BIQ")  # kind, number of buffers, pickle length
_LENGTH = struct.Struct("!Q")
MAX_BUFFERS = 1 << 20


class Kind(IntEnum):
    """What a frame carries; the payload's meaning is fixed by its kind."""

    JOB = 1  # driver -> rank: what to run (mode, function or script)
    ROWS = 2  # task -> rank: a batch of partition rows
    END = 3  # task -> rank: no more rows / session over
    ITEMS = 4  # rank -> task: a batch of results
    DONE = 5  # rank -> task: finished normally
    ERROR = 6  # rank -> task, task -> driver: a failure report (dict)
    READY = 7  # rank -> driver: MPI is initialised (sessions)
    CALL = 8  # driver -> rank: one session submission
    RESULT = 9  # rank -> driver: one session result
    OUTPUT = 10  # task -> driver: (stream, text) from the rank's stdout/stderr
    ABORT = 11  # driver -> task: kill your rank, the job has failed
    FINISHED = 12  # task -> driver: rank exited cleanly
    RESOURCES = 13  # task -> driver: its Spark-assigned resources ({"gpu": [addresses]})
    SPAWN = 14  # driver -> task: start the processes a rank's MPI_Comm_spawn asked for
    SPAWNED = 15  # task -> driver: {"id": spawn id, "error": None or why they did not start}


@dataclass
class Parts:
    """An encoded frame body: the pickle and its out-of-band buffers."""

    data: bytes | bytearray | memoryview
    buffers: list


def encode(obj: object) -> Parts:
    """``obj`` pickled with protocol 5, large contiguous buffers kept out of band."""
    buffers: list = []
    data = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    return Parts(data, [b.raw() for b in buffers])


def decode(parts: Parts) -> object:
    """The object :func:`encode` made ``parts`` from (buffers are used in place)."""
    return pickle.loads(parts.data, buffers=parts.buffers)


def _header(kind: Kind, parts: Parts) -> bytes:
    lengths = b"".join(_LENGTH.pack(memoryview(b).nbytes) for b in parts.buffers)
    return _HEADER.pack(kind, len(parts.buffers), len(parts.data)) + lengths


def send_parts(sock: socket.socket, kind: Kind, parts: Parts) -> None:
    sock.sendall(_header(kind, parts) + bytes(parts.data))
    for buf in parts.buffers:
        sock.sendall(memoryview(buf).cast("B"))


def send(sock: socket.socket, kind: Kind, obj: object = None) -> None:
    """Sends one frame; blocks until the kernel has taken all of it."""
    send_parts(sock, kind, encode(obj))


def _recv_exact(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise EOFError("peer closed the channel")
        got += k
    return buf


def recv_parts(sock: socket.socket) -> tuple[Kind, Parts]:
    """The next frame, undecoded; :class:`EOFError` if the peer closed the channel."""
    kind, nbuf, nbytes = _HEADER.unpack(_recv_exact(sock, _HEADER.size))
    if nbuf > MAX_BUFFERS:
        raise ValueError(f"corrupt frame: {nbuf} buffers")
    lengths = [_LENGTH.unpack_from(_recv_exact(sock, _LENGTH.size))[0] for _ in range(nbuf)]
    data = _recv_exact(sock, nbytes)
    return Kind(kind), Parts(data, [_recv_exact(sock, n) for n in lengths])


def recv(sock: socket.socket) -> tuple[Kind, object]:
    kind, parts = recv_parts(sock)
    return kind, decode(parts)


async def read_parts(reader: asyncio.StreamReader) -> tuple[Kind, Parts]:
    """Asyncio twin of :func:`recv_parts`."""
    kind, nbuf, nbytes = _HEADER.unpack(await reader.readexactly(_HEADER.size))
    if nbuf > MAX_BUFFERS:
        raise ValueError(f"corrupt frame: {nbuf} buffers")
    raw = await reader.readexactly(_LENGTH.size * nbuf)
    lengths = [_LENGTH.unpack_from(raw, i * _LENGTH.size)[0] for i in range(nbuf)]
    data = await reader.readexactly(nbytes)
    return Kind(kind), Parts(data, [await reader.readexactly(n) for n in lengths])


def write_parts(writer: asyncio.StreamWriter, kind: Kind, parts: Parts) -> None:
    """Asyncio twin of :func:`send_parts` (the caller drains)."""
    writer.write(_header(kind, parts))
    writer.write(bytes(parts.data))
    for buf in parts.buffers:
        writer.write(memoryview(buf).cast("B"))
