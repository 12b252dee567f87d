"""The spawner's side of the handshake: an authenticated socket to hand to MPI as ``PMI_FD``."""

from __future__ import annotations

import socket

from sparkmpi.pmi.auth import PMI_PURPOSE, PMIAuthError, client_handshake
from sparkmpi.pmi.listener import DEFAULT_LINK_TIMEOUT_S, set_link_timeout


class ServerUnreachable(ConnectionError):
    """No TCP connection to a driver listener could be made; the message names the address."""


def open_link(
    address: tuple[str, int], what: str, connect_timeout: float, link_timeout: float
) -> socket.socket:
    """A TCP connection to ``address`` that fails within about ``link_timeout`` seconds once the
    peer stops answering. Raises :class:`ServerUnreachable` naming ``what`` and the address when
    it cannot connect within ``connect_timeout`` seconds."""
    host, port = address
    try:
        sock = socket.create_connection(address, timeout=connect_timeout)
    except TimeoutError:
        raise ServerUnreachable(
            f"cannot reach the {what} at {host}:{port}: no answer within {connect_timeout:g} s"
        ) from None
    except OSError as exc:
        why = exc.strerror or str(exc)
        raise ServerUnreachable(f"cannot reach the {what} at {host}:{port}: {why}") from None
    set_link_timeout(sock, link_timeout)
    return sock


def connect_rank(
    address: tuple[str, int],
    job_id: str,
    secret: str,
    rank: int,
    host: str,
    timeout: float = 30,
    *,
    connect_timeout: float = 10,
    link_timeout: float = DEFAULT_LINK_TIMEOUT_S,
) -> socket.socket:
    """A socket to the PMI server already admitted as ``rank`` of ``job_id``.

    The server has nothing more to say until the MPI library speaks, so the socket can be
    inherited by the rank process as ``PMI_FD``. Raises :class:`ServerUnreachable` when the
    server cannot be reached and :class:`PMIAuthError` when it refuses the rank or cannot prove
    that it knows ``secret``; ``timeout`` bounds the handshake."""
    sock = open_link(address, "PMI server", connect_timeout, link_timeout)
    try:
        sock.settimeout(timeout)
        client_handshake(sock, PMI_PURPOSE, secret, job_id, rank, host, "PMI server")
        sock.settimeout(None)
        return sock
    except TimeoutError:
        sock.close()
        raise PMIAuthError(
            f"the PMI server did not finish the handshake within {timeout:g} s"
        ) from None
    except BaseException:
        sock.close()
        raise
