"""A TCP listener for a hostile network, on a thread of its own, driven from ordinary threads.

Every connection goes through two phases. *Authentication* (``authenticate``) runs while the
connection counts as unauthenticated: at most ``max_unauthenticated`` such connections exist at
once (a new one evicts the oldest, so a flood cannot lock legitimate clients out for longer than
it takes them to answer), and the server's reader never buffers more than ``max_line`` bytes of
a line. *Conversation* (``converse``) only starts once ``authenticate`` returned a session.
Nothing a peer sends can raise out of a handler: errors end that connection, refusals are logged
at a bounded rate, and every accepted TCP socket gets keepalive probes and a user timeout so
that a peer that vanishes from the network (cable pulled, node frozen) is noticed in seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from dataclasses import dataclass

log = logging.getLogger(__name__)

Authenticate = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[object | None]]
Converse = Callable[[object, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]

DEFAULT_LINK_TIMEOUT_S = 5.0
"""How long a silent or unreachable peer keeps a connection (keepalive + TCP_USER_TIMEOUT)."""


@dataclass(frozen=True)
class ListenerLimits:
    """What one listener tolerates from peers that have not proved who they are."""

    auth_deadline: float = 5.0
    """Seconds from accept to a complete authentication line."""
    max_line: int = 4096
    """Longest line the reader buffers (the authentication line included)."""
    max_unauthenticated: int = 128
    """Connections allowed to be in the authentication phase at once."""
    link_timeout: float = DEFAULT_LINK_TIMEOUT_S
    """Seconds without an answer from the peer's host after which a connection fails."""


def set_link_timeout(sock: socket.socket, seconds: float) -> None:
    """Makes a TCP ``sock`` fail within about ``seconds`` once its peer stops answering,
    whether the connection is idle (keepalive probes) or has data in flight (TCP_USER_TIMEOUT).
    Other socket families are left as they are."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6) or seconds <= 0:
        return
    idle = max(1, int(seconds // 3))
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, max(1, int(seconds) - idle))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(seconds * 1000))


class RefusalLog:
    """Counts refused connections by reason and logs them without letting a flood fill the log:
    at most ``burst`` lines per ``window`` seconds, then one line saying how many were not shown."""

    def __init__(self, name: str, window: float = 10.0, burst: int = 5):
        self.name, self.window, self.burst = name, window, burst
        self.reasons: Counter[str] = Counter()
        self._window_start = -float("inf")
        self._shown = 0
        self._hidden = 0

    @property
    def total(self) -> int:
        return sum(self.reasons.values())

    def note(self, peer: object, why: str, reason: str | None = None) -> None:
        """Records one refusal of ``peer``; ``reason`` (default ``why``) is the counter's key."""
        self.reasons[reason or why] += 1
        now = time.monotonic()
        if now - self._window_start >= self.window:
            if self._hidden:
                log.warning(
                    "%s: %d more connections refused in the last %.0f s",
                    self.name,
                    self._hidden,
                    self.window,
                )
            self._window_start, self._shown, self._hidden = now, 0, 0
        if self._shown < self.burst:
            self._shown += 1
            log.warning("%s: refused %s: %s", self.name, _peer_text(peer), why)
        else:
            self._hidden += 1


def _peer_text(peer: object) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer)


class GuardedListener:
    """Listens on ``host:port`` (0: any free port) and runs ``authenticate`` then ``converse``
    for each connection, within ``limits``."""

    def __init__(
        self,
        name: str,
        host: str,
        port: int,
        authenticate: Authenticate,
        converse: Converse,
        limits: ListenerLimits | None = None,
    ):
        self.name, self.host, self.port = name, host, port
        self.authenticate, self.converse = authenticate, converse
        self.limits = limits or ListenerLimits()
        self.refusals = RefusalLog(name)
        self.loop: asyncio.AbstractEventLoop | None = None
        self._pending: dict[asyncio.StreamWriter, None] = {}  # oldest first
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None

    @property
    def unauthenticated(self) -> int:
        """Connections now in the authentication phase."""
        return len(self._pending)

    def refuse(self, writer: asyncio.StreamWriter, why: str, reason: str | None = None) -> None:
        """Counts and (rate-limited) logs a refusal of ``writer``'s peer."""
        self.refusals.note(writer.get_extra_info("peername"), why, reason)

    # -- life cycle -------------------------------------------------------------------------
    def start(self) -> None:
        """Returns once the port is bound; raises what binding raised."""
        ready: Future[None] = Future()
        self._thread = threading.Thread(
            target=self._run, args=(ready,), name=self.name, daemon=True
        )
        self._thread.start()
        try:
            ready.result(timeout=30)
        except BaseException:
            self._thread = None
            raise

    def _run(self, ready: Future[None]) -> None:
        loop = self.loop = asyncio.new_event_loop()
        try:
            self._server = loop.run_until_complete(
                asyncio.start_server(
                    self._connection, self.host, self.port, limit=self.limits.max_line
                )
            )
            self.port = self._server.sockets[0].getsockname()[1]
        except BaseException as exc:
            ready.set_exception(exc)
            return
        ready.set_result(None)
        loop.run_forever()
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()

    def call(self, fn: Callable[[], object]) -> None:
        """Runs ``fn`` on the server thread soon (does not wait)."""
        assert self.loop is not None
        self.loop.call_soon_threadsafe(fn)

    def run(self, fn: Callable[[], object], timeout: float = 10) -> None:
        """Runs ``fn`` on the server thread and waits for it to finish."""
        loop = self.loop
        if loop is None or not loop.is_running():
            fn()
            return

        async def wrapper() -> None:
            fn()

        asyncio.run_coroutine_threadsafe(wrapper(), loop).result(timeout=timeout)

    def stop(self) -> None:
        """Stops listening and ends the thread (idempotent)."""
        thread, loop = self._thread, self.loop
        if thread is None or loop is None:
            return
        self._thread = None
        if self._server is not None:
            loop.call_soon_threadsafe(self._server.close)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)

    # -- connections ------------------------------------------------------------------------
    def _admit_pending(self, writer: asyncio.StreamWriter) -> None:
        while len(self._pending) >= self.limits.max_unauthenticated:
            oldest = next(iter(self._pending))
            del self._pending[oldest]
            self.refuse(oldest, "evicted: too many unauthenticated connections", "evicted")
            oldest.transport.abort()
        self._pending[writer] = None

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        sock = writer.get_extra_info("socket")
        if sock is not None:
            set_link_timeout(sock, self.limits.link_timeout)
        self._admit_pending(writer)
        try:
            try:
                session = await self.authenticate(reader, writer)
            finally:
                self._pending.pop(writer, None)
            if session is not None:
                await self.converse(session, reader, writer)
        except (ConnectionError, OSError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        except Exception:  # a bug of ours must not kill the listener or flood the log
            log.exception("%s: connection handler failed", self.name)
        finally:
            writer.close()


async def read_first_line(
    listener: GuardedListener, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> bytes | None:
    """The peer's first line (newline included) if it arrives whole within the listener's
    deadline and length limit; None (the refusal counted) otherwise."""
    limits = listener.limits
    try:
        async with asyncio.timeout(limits.auth_deadline):
            line = await reader.readuntil(b"\n")
    except TimeoutError:
        listener.refuse(writer, f"no authentication within {limits.auth_deadline:g} s", "deadline")
        return None
    except asyncio.LimitOverrunError:
        listener.refuse(writer, f"first line longer than {limits.max_line} bytes", "oversized")
        return None
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            listener.refuse(writer, "connection ended inside its first line", "truncated")
        return None
    return line
