"""The PMI-1 client side of a PMIx host: speaks to sparkmpi's PMI server on an inherited socket.

One :class:`PMIUpstream` belongs to one rank's host and must be used from one thread at a
time; every call is a blocking request/reply exchange.
"""

from __future__ import annotations

import base64
import socket

from sparkmpi.pmi.mapping import nodes_from_mapping
from sparkmpi.pmi.protocol import (
    KEYLEN_MAX,
    VALLEN_MAX,
    PMICommand,
    format_command,
    parse_command,
)

CHUNK = (VALLEN_MAX - 24) // 4 * 4
"""Base64 characters per PMI value: below ``VALLEN_MAX`` with room to spare."""


class UpstreamError(RuntimeError):
    """The PMI server refused a command, closed the connection, or said something unexpected."""


class PMIUpstream:
    """A PMI-1 conversation as ``rank`` of ``size`` on an already admitted socket."""

    def __init__(self, sock: socket.socket, rank: int, size: int) -> None:
        self.sock = sock
        self.rank = rank
        self.size = size
        self.kvsname = ""
        self._buffer = b""

    # --- the wire ---------------------------------------------------------------------------

    def _send(self, line: str) -> None:
        try:
            self.sock.sendall(line.encode())
        except OSError as exc:
            raise UpstreamError(f"cannot write to the PMI server: {exc}") from None

    def _read_line(self) -> PMICommand:
        while b"\n" not in self._buffer:
            try:
                chunk = self.sock.recv(65536)
            except OSError as exc:
                raise UpstreamError(f"cannot read from the PMI server: {exc}") from None
            if not chunk:
                raise UpstreamError("the PMI server closed the connection")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return parse_command(line)

    def _call(self, line: str, reply: str) -> PMICommand:
        self._send(line)
        answer = self._read_line()
        if answer.cmd != reply:
            raise UpstreamError(f"expected cmd={reply} from the PMI server, got {answer.raw!r}")
        rc = answer.get("rc", "0")
        if rc != "0":
            raise UpstreamError(f"the PMI server refused {line.split()[0]}: {answer.get('msg')}")
        return answer

    # --- PMI-1 commands ---------------------------------------------------------------------

    def init(self) -> None:
        """``init`` then ``get_my_kvsname``: afterwards :attr:`kvsname` is set."""
        self._call(format_command("init", pmi_version=1, pmi_subversion=1), "response_to_init")
        self._call(format_command("get_maxes"), "maxes")
        self.kvsname = self._call(format_command("get_my_kvsname"), "my_kvsname").require("kvsname")

    def get(self, key: str) -> str:
        """The value of ``key`` in the job's KVS; :class:`UpstreamError` if it has none."""
        line = format_command("get", kvsname=self.kvsname, key=key)
        return self._call(line, "get_result").require("value")

    def put(self, key: str, value: str) -> None:
        """Stores ``key=value`` (both within the PMI-1 length limits)."""
        if len(key) > KEYLEN_MAX or len(value) > VALLEN_MAX:
            raise ValueError("PMI key or value too long")
        self._call(format_command("put", kvsname=self.kvsname, key=key, value=value), "put_result")

    def barrier(self) -> None:
        """Returns once every rank of the job has entered the barrier."""
        self._call(format_command("barrier_in"), "barrier_out")

    def node_of_each_rank(self) -> list[int]:
        """The node id of every rank, from ``PMI_process_mapping`` (waits for all to join)."""
        return nodes_from_mapping(self.get("PMI_process_mapping"), self.size)

    def allgather(self, tag: str, blob: bytes) -> list[bytes]:
        """Every rank's ``blob`` for this ``tag``, in rank order (this rank's own included).

        All ranks must call it with the same ``tag``, which must be new to the job's KVS. The
        blob travels base64-encoded in chunks below ``VALLEN_MAX``.
        """
        text = base64.b64encode(blob).decode()
        chunks = [text[i : i + CHUNK] for i in range(0, len(text), CHUNK)]
        for i, chunk in enumerate(chunks):
            self.put(f"{tag}-{self.rank}-{i}", chunk)
        self.put(f"{tag}-{self.rank}-n", str(len(chunks)))
        self.barrier()
        result: list[bytes] = []
        for rank in range(self.size):
            if rank == self.rank:
                result.append(blob)
                continue
            count = int(self.get(f"{tag}-{rank}-n"))
            parts = [self.get(f"{tag}-{rank}-{i}") for i in range(count)]
            result.append(base64.b64decode("".join(parts)))
        return result

    def abort(self, exitcode: int, message: str) -> None:
        """``cmd=abort``: the server answers nothing; the job is ended by the driver."""
        text = message.replace("\n", " ").strip() or "aborted"
        self._send(format_command("abort", exitcode=exitcode, message=text))

    def finalize(self) -> None:
        """``cmd=finalize``: this rank leaves the job cleanly."""
        self._call(format_command("finalize"), "finalize_ack")

    def peer_closed(self) -> bool:
        """Whether the server has closed the connection (checked without blocking)."""
        try:
            data = self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return True
        return not data
