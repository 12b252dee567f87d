"""Challenge-response admission to the driver's listeners: the job secret never crosses the wire.

The server speaks first with a fresh random nonce::

    server: cmd=challenge nonce=<32 hex> scheme=hmac-sha256
    client: cmd=auth job=<id> rank=<r> host=<h> cnonce=<32 hex> digest=<HMAC(secret, ...)>
    server: cmd=auth_result rc=0 proof=<HMAC(secret, ...)> [fields...]   or   rc=-1 msg=<why>

The client's digest covers the listener's *purpose* (``pmi`` or ``control``), both nonces and
every claim (job, rank, host), so it cannot be replayed on another connection, on the other
listener, or for another rank. The server's proof shows the client that it talks to the driver
that holds the secret, before the client hands the socket to MPI or unpickles anything from it.
Lines are PMI-1 lines (:mod:`sparkmpi.pmi.protocol`).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol, TypeVar

from sparkmpi.pmi.listener import GuardedListener, read_first_line
from sparkmpi.pmi.protocol import (
    MAX_LINE,
    PMICommand,
    PMIProtocolError,
    format_command,
    parse_command,
)

SCHEME = "hmac-sha256"
NONCE_BYTES = 16
PMI_PURPOSE = "pmi"
CONTROL_PURPOSE = "control"


class HasSecret(Protocol):
    secret: str


Job = TypeVar("Job", bound=HasSecret)


class PMIAuthError(ConnectionError):
    """The server refused this client, or did not prove that it knows the job's secret."""


@dataclass(frozen=True)
class Claims:
    """Who an authenticated client is: its job, rank and host, and the handshake's nonces."""

    job: str
    rank: int
    host: str
    server_nonce: str
    client_nonce: str


def _mac(secret: str, *fields: object) -> str:
    message = "\0".join(str(f) for f in fields).encode()
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def client_digest(secret: str, purpose: str, claims: Claims) -> str:
    """What a client that knows ``secret`` answers to the challenge."""
    c = claims
    return _mac(secret, "client", purpose, c.server_nonce, c.client_nonce, c.job, c.rank, c.host)


def server_proof(secret: str, purpose: str, claims: Claims) -> str:
    """What the server that knows ``secret`` proves itself with."""
    c = claims
    return _mac(secret, "server", purpose, c.server_nonce, c.client_nonce, c.job, c.rank)


def challenge_line(nonce: str) -> bytes:
    return format_command("challenge", nonce=nonce, scheme=SCHEME).encode()


def refusal_line(why: str) -> bytes:
    return format_command("auth_result", rc=-1, msg=why.replace(" ", "_")).encode()


def acceptance_line(secret: str, purpose: str, claims: Claims, **fields: object) -> bytes:
    proof = server_proof(secret, purpose, claims)
    return format_command("auth_result", rc=0, proof=proof, **fields).encode()


# -- the server's side ----------------------------------------------------------------------
async def authenticate_peer(
    listener: GuardedListener,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    purpose: str,
    jobs: Mapping[str, Job],
) -> tuple[Claims, Job] | None:
    """Runs the challenge on a fresh connection: the verified claims and their job (from
    ``jobs``, by id), or None after refusing the peer (a reply is sent where the peer may learn
    why: never which of job and digest was wrong). Nothing the peer sends is trusted before the
    digest matched."""
    server_nonce = secrets.token_hex(NONCE_BYTES)
    writer.write(challenge_line(server_nonce))
    await writer.drain()
    line = await read_first_line(listener, reader, writer)
    if line is None:
        return None

    def refuse(why: str, reason: str) -> None:
        listener.refuse(writer, why, reason)
        writer.write(refusal_line(why))

    try:
        command = parse_command(line)
        if command.cmd != "auth":
            refuse(f"not authenticated (cmd={command.cmd}; answer the challenge first)", "unauth")
            return None
        claims = Claims(
            job=command.require("job"),
            rank=command.require_int("rank"),
            host=command.require("host"),
            server_nonce=server_nonce,
            client_nonce=command.require("cnonce"),
        )
        digest = command.require("digest")
    except PMIProtocolError as exc:
        refuse(f"malformed: {exc}", "malformed")
        return None
    job = jobs.get(claims.job)
    secret = job.secret if job is not None else secrets.token_hex(16)
    expected = client_digest(secret, purpose, claims)
    if job is None or not hmac.compare_digest(digest.encode(), expected.encode()):
        refuse("unknown job or wrong response", "wrong response")
        return None
    return claims, job


# -- the client's side ----------------------------------------------------------------------
def _read_line(sock: socket.socket, what: str) -> PMICommand:
    data = bytearray()
    while not data.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            raise PMIAuthError(f"the {what} closed the connection during the handshake")
        data += chunk
        if len(data) > MAX_LINE:
            raise PMIAuthError(f"the {what} sent an over-long handshake line")
    try:
        return parse_command(bytes(data))
    except PMIProtocolError as exc:
        raise PMIAuthError(f"the {what} sent a malformed handshake line: {exc}") from None


def client_handshake(
    sock: socket.socket,
    purpose: str,
    secret: str,
    job: str,
    rank: int,
    host: str,
    what: str = "server",
) -> PMICommand:
    """Answers the server's challenge on a connected ``sock`` and checks its proof.

    Returns the server's ``auth_result`` (its extra fields, e.g. ``kvsname``). Raises
    :class:`PMIAuthError` when refused or when the server cannot prove it knows ``secret``;
    the caller's socket timeout bounds every read."""
    challenge = _read_line(sock, what)
    nonce = challenge.get("nonce")
    if challenge.cmd != "challenge" or challenge.get("scheme") != SCHEME or not nonce:
        raise PMIAuthError(f"the {what} did not send a {SCHEME} challenge")
    claims = Claims(job, rank, host, nonce, secrets.token_hex(NONCE_BYTES))
    digest = client_digest(secret, purpose, claims)
    line = format_command(
        "auth", job=job, rank=rank, host=host, cnonce=claims.client_nonce, digest=digest
    )
    sock.sendall(line.encode())
    reply = _read_line(sock, what)
    if reply.cmd != "auth_result" or reply.get("rc") != "0":
        why = (reply.get("msg") or "refused").replace("_", " ")
        raise PMIAuthError(f"the {what} refused rank {rank} of job {job}: {why}")
    proof = reply.get("proof") or ""
    if not hmac.compare_digest(proof.encode(), server_proof(secret, purpose, claims).encode()):
        raise PMIAuthError(f"the {what} could not prove that it holds job {job}'s secret")
    return reply
