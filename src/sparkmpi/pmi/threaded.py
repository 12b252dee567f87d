"""An asyncio TCP server on a daemon thread of its own, driven from ordinary threads."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import Future

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class ServerThread:
    """Listens on ``host:port`` (0: any free port) and runs ``handler`` per connection."""

    def __init__(self, handler: Handler, host: str, port: int, limit: int, name: str):
        self.handler, self.host, self.port, self.limit, self.name = handler, host, port, limit, name
        self.loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None

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
                asyncio.start_server(self.handler, self.host, self.port, limit=self.limit)
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
