"""The driver's PMI and control listeners facing a hostile network: floods, slow and oversized
first lines, wrong and replayed answers, and a server that cannot prove it holds the secret."""

from __future__ import annotations

import contextlib
import logging
import pickle
import socket
import threading
import time

import psutil
import pytest

from helpers import finish, start_ranks
from sparkmpi.pmi import ListenerLimits, PMIAuthError, connect_rank, format_command
from sparkmpi.pmi.auth import Claims, client_digest, client_handshake
from sparkmpi.pmi.listener import set_link_timeout
from sparkmpi.runner.frames import Kind, encode
from sparkmpi.runner.hub import DriverHub

ALLREDUCE = (
    "from mpi4py import MPI; import numpy as np; c = MPI.COMM_WORLD;"
    "a = np.full(1000, c.rank + 1.0); b = np.empty_like(a); c.Allreduce(a, b);"
    "print(c.rank, c.size, int(b[0]))"
)
LIMITS = ListenerLimits(auth_deadline=3.0, max_unauthenticated=16)  # margin for a loaded CI


@pytest.fixture
def hub():
    hub = DriverHub(limits=LIMITS).start()
    yield hub
    hub.stop()


def listeners(hub: DriverHub):
    """(name, address, purpose, listener) of the hub's two ports."""
    return [
        ("pmi", hub.pmi.address, "pmi", hub.pmi.listener),
        ("control", hub.address, "control", hub.listener),
    ]


def challenge(sock: socket.socket) -> str:
    line = sock.makefile("rb").readline()
    assert line.startswith(b"cmd=challenge "), line
    return line.decode().split("nonce=")[1].split()[0]


def closed_by_server(sock: socket.socket, timeout: float = 30) -> bool:
    """True once the server has closed ``sock`` (reads until end of file or reset)."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    return True


def wait_until(predicate, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.mark.parametrize("port", ["pmi", "control"])
def test_an_idle_flood_is_capped_and_jobs_still_run(hub, port):
    _, address, _, listener = next(x for x in listeners(hub) if x[0] == port)
    flood = [socket.create_connection(address, timeout=30) for _ in range(120)]
    try:
        for sock in flood:
            challenge(sock)  # the server has accepted it
        assert listener.unauthenticated <= LIMITS.max_unauthenticated
        dropped = listener.refusals.reasons["evicted"] + listener.refusals.reasons["deadline"]
        assert dropped >= 120 - LIMITS.max_unauthenticated
        job = start_ranks(hub.pmi, 2, ALLREDUCE)
        assert sorted(finish(job)) == ["0 2 3\n", "1 2 3\n"]
        # what the flood still holds is dropped at the authentication deadline
        assert wait_until(lambda: listener.unauthenticated == 0)
        assert listener.refusals.reasons["deadline"] >= 1
    finally:
        for sock in flood:
            sock.close()


@pytest.mark.parametrize("port", ["pmi", "control"])
def test_a_slow_loris_is_dropped_at_the_deadline(hub, port):
    _, address, _, listener = next(x for x in listeners(hub) if x[0] == port)
    with socket.create_connection(address, timeout=30) as sock:
        challenge(sock)
        dropped = threading.Event()

        def drip() -> None:
            try:
                while not dropped.is_set():
                    sock.sendall(b"c")
                    time.sleep(0.05)
            except OSError:
                pass

        threading.Thread(target=drip, daemon=True).start()
        assert closed_by_server(sock)
        dropped.set()
    assert listener.refusals.reasons["deadline"] == 1


@pytest.mark.parametrize("port", ["pmi", "control"])
def test_oversized_first_lines_are_refused_without_buffering_them(hub, port):
    _, address, _, listener = next(x for x in listeners(hub) if x[0] == port)
    rss_before = psutil.Process().memory_info().rss
    blob = b"x" * (16 << 20)
    for _ in range(8):
        with socket.create_connection(address, timeout=30) as sock:
            challenge(sock)
            with contextlib.suppress(OSError):  # the server closes it part-way: what we want
                sock.sendall(blob)
            assert closed_by_server(sock)
    assert listener.refusals.reasons["oversized"] == 8
    # before: 8 x 16 MB held in the driver; now at most a few reads of 256 KiB each
    assert psutil.Process().memory_info().rss - rss_before < 64 << 20


@pytest.mark.parametrize("port", ["pmi", "control"])
def test_wrong_secret_unknown_job_and_garbage_are_refused(hub, port):
    _, address, purpose, listener = next(x for x in listeners(hub) if x[0] == port)
    job = hub.create_job(1, output=None)
    attempts = [(job.job_id, "not the secret"), ("nojob", job.secret)]
    for job_id, secret in attempts:
        with (
            socket.create_connection(address, timeout=30) as sock,
            pytest.raises(PMIAuthError, match="wrong response"),
        ):
            client_handshake(sock, purpose, secret, job_id, 0, "h")
    for garbage in (b"GET / HTTP/1.1\n", b"cmd=auth job=[[[[[[[[[[\n", b"\x80\x04\x95\n"):
        with socket.create_connection(address, timeout=30) as sock:
            challenge(sock)
            sock.sendall(garbage)
            assert b"rc=-1" in sock.makefile("rb").readline()
    assert listener.refusals.total >= 5
    hub.close_job(job)


def answer(job, rank: int, nonce: str, purpose: str, client_nonce: str) -> bytes:
    """A correct answer to the challenge ``nonce`` for ``purpose``, as a real task sends it."""
    claims = Claims(job.job_id, rank, "h", nonce, client_nonce)
    digest = client_digest(job.secret, purpose, claims)
    line = format_command("auth", job=job.job_id, rank=rank, host="h", cnonce=client_nonce)
    return line.rstrip("\n").encode() + f" digest={digest}\n".encode()


@pytest.mark.parametrize("port", ["pmi", "control"])
def test_a_replayed_response_is_refused(hub, port):
    _, address, purpose, _ = next(x for x in listeners(hub) if x[0] == port)
    job = hub.create_job(2, output=None)
    with socket.create_connection(address, timeout=30) as first:
        recorded = answer(job, 0, challenge(first), purpose, "ab" * 16)
        # what an eavesdropper saw on the first connection, sent again on a second one
        with socket.create_connection(address, timeout=30) as second:
            challenge(second)
            second.sendall(recorded)
            assert b"rc=-1" in second.makefile("rb").readline()
        first.sendall(recorded)
        reply = first.makefile("rb").readline()
        assert b"rc=0" in reply and b"proof=" in reply
    other = "control" if purpose == "pmi" else "pmi"
    with socket.create_connection(address, timeout=30) as crossed:
        crossed.sendall(answer(job, 1, challenge(crossed), other, "cd" * 16))
        assert b"rc=-1" in crossed.makefile("rb").readline()
    hub.close_job(job)


def test_nothing_is_unpickled_before_authentication(hub, tmp_path):
    marker = tmp_path / "unpickled"

    class Trap:
        def __reduce__(self):
            return (marker.touch, ())

    frame = encode(Trap())
    header = bytes([Kind.ERROR]) + (0).to_bytes(4, "big") + len(frame.data).to_bytes(8, "big")
    for address in (hub.address, hub.pmi.address):
        with socket.create_connection(address, timeout=30) as sock:
            challenge(sock)
            sock.sendall(header + bytes(frame.data) + b"\n")
            assert closed_by_server(sock)
    assert not marker.exists()
    pickle.loads(pickle.dumps(Trap()))  # the trap works when it is unpickled
    assert marker.exists()


def test_a_server_that_cannot_prove_the_secret_gets_no_rank():
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()

        def impostor() -> None:
            conn, _ = listening.accept()
            with conn:
                conn.sendall(b"cmd=challenge nonce=" + b"0" * 32 + b" scheme=hmac-sha256\n")
                conn.makefile("rb").readline()
                conn.sendall(b"cmd=auth_result rc=0 kvsname=k proof=" + b"1" * 64 + b"\n")

        threading.Thread(target=impostor, daemon=True).start()
        with pytest.raises(PMIAuthError, match="could not prove"):
            connect_rank(listening.getsockname(), "job", "secret", 0, "h")


def test_refusals_are_logged_at_a_bounded_rate(hub, caplog):
    caplog.set_level(logging.WARNING, logger="sparkmpi.pmi.listener")
    for _ in range(60):
        with socket.create_connection(hub.pmi.address, timeout=30) as sock:
            challenge(sock)
            sock.sendall(b"nonsense\n")
            sock.makefile("rb").readline()
    assert hub.pmi.refused >= 60
    lines = [r for r in caplog.records if r.name == "sparkmpi.pmi.listener"]
    assert 1 <= len(lines) <= hub.pmi.listener.refusals.burst + 1


def test_links_get_keepalive_and_a_user_timeout():
    with socket.socket() as sock:
        set_link_timeout(sock, 5)
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 5000
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 1
