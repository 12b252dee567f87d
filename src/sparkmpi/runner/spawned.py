"""The processes a rank's ``MPI_Comm_spawn`` starts, run by the task that owns the rank.

The driver's PMI server turns the rank's request into a new PMI job (own KVS with the preput
values, own ``PMI_process_mapping``) and sends it here over the control link. The task
connects each child to that job and starts it beside its parent with ``PMI_SPAWNED=1``, so
children are the task's children as the rank is: their output is relayed with a
``[spawned N]`` prefix, a child that fails fails the job, and they die with the job.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import shlex
import socket
import subprocess
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sparkmpi.pmi import PMIAuthError, ServerUnreachable, connect_rank
from sparkmpi.runner.runtime import PMI_VARIABLES, pmi_env

STDERR_TAIL_LINES = 20
DRAIN_S = 2.0


class SpawnRefused(RuntimeError):
    """The children could not be started; the message says why, in one line."""


@dataclass
class Child:
    """One started child: its rank in the spawned job (``[spawned N]``), what it runs, its
    process."""

    rank: int
    argv: list[str]
    proc: subprocess.Popen
    pidfd: int
    stderr_tail: deque[str]
    partial: dict[str, bytes]


def child_env(base: dict[str, str]) -> dict[str, str]:
    """The environment a child starts from: this process's, without any PMI variable, plus
    ``base`` (the job's and MPI library's variables)."""
    env = {k: v for k, v in os.environ.items() if k not in PMI_VARIABLES}
    env.update(base)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _argv_and_cwd(command: dict) -> tuple[list[str], str | None]:
    execname = command["execname"]
    info = dict(command["info"])
    if info.get("path") and "/" not in execname:
        execname = str(Path(info["path"]) / execname)
    cwd = info.get("wdir") or None
    if cwd is not None and not Path(cwd).is_dir():
        raise SpawnRefused(f"info wdir={cwd!r} is not a directory on {socket.gethostname()}")
    return [execname, *command["argv"]], cwd


class SpawnedProcesses:
    """The children of one rank (all its spawns): ``relay(stream, text)`` gets their output;
    their pipes and exits are watched in ``sel``, whose events go to :meth:`on_event`."""

    def __init__(
        self, env: dict[str, str], relay: Callable[[str, str], None], sel: selectors.BaseSelector
    ):
        self.env = env
        self.relay = relay
        self.sel = sel
        self.children: dict[int, Child] = {}

    def start(
        self, request: dict, pmi: tuple[str, int], timeout: float, only: int | None = None
    ) -> list[Child]:
        """Starts every process of ``request`` (a SPAWN frame), or only rank ``only`` of the
        spawned job, each admitted to that job; all or none: :class:`SpawnRefused` after
        killing those already started."""
        started: list[Child] = []
        host = socket.gethostname()
        rank = 0
        try:
            for command in request["commands"]:
                argv, cwd = _argv_and_cwd(command)
                for _ in range(command["nprocs"]):
                    if only is None or rank == only:
                        child = self._start_one(request, pmi, timeout, host, rank, argv, cwd)
                        started.append(child)
                    rank += 1
        except (SpawnRefused, OSError, PMIAuthError, ServerUnreachable) as exc:
            for child in started:
                self._kill(child)
            if isinstance(exc, FileNotFoundError | PermissionError):
                raise SpawnRefused(f"cannot start {exc.filename!r}: {exc.strerror}") from None
            raise SpawnRefused(str(exc)) from None
        for child in started:
            self.children[id(child)] = child
            self.sel.register(child.proc.stdout, selectors.EVENT_READ, ("stdout", child))
            self.sel.register(child.proc.stderr, selectors.EVENT_READ, ("stderr", child))
            self.sel.register(child.pidfd, selectors.EVENT_READ, ("exit", child))
        return started

    def on_event(self, event: str, child: Child) -> dict | None:
        """Handles one selector event of ``child``; a failure report when it exited non-zero."""
        if event != "exit":
            if not self.read(child, event):
                self.sel.unregister(child.proc.stdout if event == "stdout" else child.proc.stderr)
            return None
        self._drain(child)
        failure = self.exited(child)
        if failure is None:
            return None
        return {"reason": failure, "stderr": "\n".join(child.stderr_tail)}

    def _drain(self, child: Child) -> None:
        """Reads what an ended child left in its pipes, for at most DRAIN_S."""
        self._unwatch(child)
        pipes = selectors.DefaultSelector()
        for stream, pipe in (("stdout", child.proc.stdout), ("stderr", child.proc.stderr)):
            pipes.register(pipe, selectors.EVENT_READ, stream)
        deadline = time.monotonic() + DRAIN_S
        with pipes:
            while pipes.get_map() and (left := deadline - time.monotonic()) > 0:
                for key, _ in pipes.select(left):
                    if not self.read(child, key.data):
                        pipes.unregister(key.fileobj)

    def _unwatch(self, child: Child) -> None:
        for fileobj in (child.proc.stdout, child.proc.stderr, child.pidfd):
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(fileobj)

    def _start_one(self, request, pmi, timeout, host, rank, argv, cwd) -> Child:
        sock = connect_rank(
            pmi, request["job_id"], request["secret"], rank, host, timeout, connect_timeout=timeout
        )
        env = child_env(self.env)
        env.update(pmi_env(sock.fileno(), rank, request["size"]), PMI_SPAWNED="1")
        try:
            proc = subprocess.Popen(
                argv,
                env=env,
                cwd=cwd,
                pass_fds=(sock.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
        finally:
            sock.close()
        tail: deque[str] = deque(maxlen=STDERR_TAIL_LINES)
        partial = {"stdout": b"", "stderr": b""}
        return Child(rank, argv, proc, os.pidfd_open(proc.pid), tail, partial)

    def read(self, child: Child, stream: str) -> bool:
        """Relays what ``child`` wrote on ``stream``; False at end of file."""
        pipe = child.proc.stdout if stream == "stdout" else child.proc.stderr
        assert pipe is not None
        data = os.read(pipe.fileno(), 65536)
        text = child.partial[stream] + (data or (b"\n" if child.partial[stream] else b""))
        complete, _, child.partial[stream] = text.rpartition(b"\n")
        if complete:
            lines = complete.decode(errors="replace").splitlines()
            if stream == "stderr":
                child.stderr_tail.extend(lines)
            prefix = f"[spawned {child.rank}] "
            self.relay(stream, "".join(f"{prefix}{line}\n" for line in lines))
        return bool(data)

    def exited(self, child: Child) -> str | None:
        """Forgets a child that has ended; why it failed, or None if it exited with 0."""
        code = child.proc.wait()
        self.children.pop(id(child), None)
        with contextlib.suppress(OSError):
            os.close(child.pidfd)
        if code == 0:
            return None
        how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
        command = shlex.join(child.argv).replace("\n", "\\n")
        if len(command) > 200:
            command = command[:197] + "..."
        return f"process {child.rank} it spawned ({command}) {how}"

    def close(self) -> None:
        """Kills (if still running) and forgets every child."""
        for child in list(self.children.values()):
            self._unwatch(child)
            self._kill(child)
            self.children.pop(id(child), None)

    @staticmethod
    def _kill(child: Child) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.proc.pid, 9)
        child.proc.wait()
        for pipe in (child.proc.stdout, child.proc.stderr):
            if pipe is not None:
                pipe.close()
        with contextlib.suppress(OSError):
            os.close(child.pidfd)
