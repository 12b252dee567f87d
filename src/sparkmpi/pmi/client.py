"""The spawner's side of the handshake: an authenticated socket to hand to MPI as ``PMI_FD``."""

from __future__ import annotations

import socket

from sparkmpi.pmi.protocol import MAX_LINE, PMIProtocolError, format_command, parse_command


class PMIAuthError(ConnectionError):
    """The PMI server refused to admit this rank."""


def connect_rank(
    address: tuple[str, int], job_id: str, secret: str, rank: int, host: str, timeout: float = 30
) -> socket.socket:
    """A socket to the PMI server already admitted as ``rank`` of ``job_id``.

    The server has nothing more to say until the MPI library speaks, so the socket can be
    inherited by the rank process as ``PMI_FD``. Raises :class:`PMIAuthError` when refused.
    """
    sock = socket.create_connection(address, timeout=timeout)
    try:
        line = format_command("auth", job=job_id, rank=rank, secret=secret, host=host)
        sock.sendall(line.encode())
        reply = _read_line(sock)
        try:
            command = parse_command(reply)
        except PMIProtocolError as exc:
            raise PMIAuthError(f"PMI server sent a malformed reply: {exc}") from None
        if command.cmd != "auth_result" or command.get("rc") != "0":
            why = (command.get("msg") or "refused").replace("_", " ")
            raise PMIAuthError(f"PMI server refused rank {rank} of job {job_id}: {why}")
        sock.settimeout(None)
        return sock
    except BaseException:
        sock.close()
        raise


def _read_line(sock: socket.socket) -> bytes:
    data = bytearray()
    while not data.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            raise PMIAuthError("PMI server closed the connection during the handshake")
        data += chunk
        if len(data) > MAX_LINE:
            raise PMIAuthError("PMI server reply too long")
    return bytes(data)
