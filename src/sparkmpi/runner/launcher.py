"""The Spark task's side: start one rank process, feed it, watch it, and never outlive it.

:func:`barrier_task` is the function of the barrier stage. The task admits its rank to the
job's PMI space, starts ``python -m sparkmpi.runner.rank`` with the admitted socket as
``PMI_FD``, streams the partition's rows in, forwards the rank's output to the driver, and
relays results back. If the rank fails the task reports it and raises; if the driver says
another rank failed, the task kills its rank (SIGKILL: MPICH ranks busy-poll) and raises.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from sparkmpi.pmi import PMIAuthError, ServerUnreachable, connect_rank, open_link
from sparkmpi.pmi.auth import CONTROL_PURPOSE, client_handshake
from sparkmpi.pmix import HostFailed
from sparkmpi.runner.frames import Kind, Parts, decode, encode, recv_parts, send, send_parts
from sparkmpi.runner.proctree import become_subreaper, children_now, kill_tree
from sparkmpi.runner.resources import gpu_env, task_gpus
from sparkmpi.runner.runtime import MPIRuntime, get_runtime
from sparkmpi.runner.spare import request_spare, spares_paused, take_spare
from sparkmpi.runner.spawned import SpawnedProcesses, SpawnRefused, child_env

RANK_MODULE = "sparkmpi.runner.rank"
ROWS_PER_FRAME = 256
STDERR_TAIL_LINES = 20
HANDSHAKE_TIMEOUT_S = 30.0
DRAIN_S = 2.0
"""How long a finished rank's pipes are read for what it printed last."""
ADDRESS_HINT = (
    "the executors must reach the driver there; set --pmi-host or spark.sparkmpi.pmi.host "
    "to an address of the driver that they can reach"
)


class RankFailed(RuntimeError):
    """This task's rank failed (the driver has the full report)."""


class RankAborted(RuntimeError):
    """This task's rank was killed because the job failed elsewhere."""


@dataclass(frozen=True)
class TaskSpec:
    """Everything a task needs to start its rank; pickled into the barrier stage's closure."""

    job_id: str
    secret: str
    size: int
    hub: tuple[str, int]
    pmi: tuple[str, int]
    mode: str  # "run" | "session" | "script" | "spawned"
    job: bytes  # the JOB frame body for the rank (encoded)
    runtime: str = "mpich"
    env: dict[str, str] = field(default_factory=dict)
    prestart: bool = True  # keep a pre-started rank interpreter in each worker (spare.py)
    link_timeout: float = 5.0  # seconds to connect to the driver, and a silent driver keeps a link


def barrier_task(spec: TaskSpec, rows: Iterable) -> Iterator:
    """mapPartitions body of the barrier stage: one rank, its results as an iterator."""
    from pyspark import BarrierTaskContext

    ctx = BarrierTaskContext.get()
    rank = ctx.partitionId()
    if ctx.attemptNumber() > 0:
        raise RankFailed(f"rank {rank}: MPI job {spec.job_id} is not retried after a failure")
    gpus = task_gpus(ctx)
    env = gpu_env(gpus, spec.env)
    return iter(launch_rank(spec, rank, rows, env, get_runtime(spec.runtime), gpus))


def connect_control(spec: TaskSpec, rank: int, host: str) -> socket.socket:
    """The task's authenticated control link to the driver, as ``rank`` of ``spec``'s job."""
    try:
        sock = open_link(spec.hub, "driver's control port", spec.link_timeout, spec.link_timeout)
    except ServerUnreachable as exc:
        raise RankFailed(f"MPI rank {rank} on {host} failed: {exc} ({ADDRESS_HINT})") from None
    try:
        sock.settimeout(HANDSHAKE_TIMEOUT_S)
        client_handshake(sock, CONTROL_PURPOSE, spec.secret, spec.job_id, rank, host, "driver")
        sock.settimeout(None)
        return sock
    except (PMIAuthError, TimeoutError) as exc:
        sock.close()
        raise RankAborted(f"rank {rank}: no control link to the driver: {exc}") from None
    except BaseException:
        sock.close()
        raise


def _pmi_connect(spec: TaskSpec, rank: int, host: str, control: socket.socket) -> socket.socket:
    """The admitted PMI socket; if the PMI server cannot be reached, the driver is told over
    the control link (so the job fails at once, naming this rank and node) and RankFailed."""
    try:
        return connect_rank(
            spec.pmi,
            spec.job_id,
            spec.secret,
            rank,
            host,
            HANDSHAKE_TIMEOUT_S,
            connect_timeout=spec.link_timeout,
            link_timeout=spec.link_timeout,
        )
    except ServerUnreachable as exc:
        reason = f"{exc} ({ADDRESS_HINT})"
        with contextlib.suppress(OSError):
            send(control, Kind.ERROR, {"rank": rank, "host": host, "reason": reason})
        raise RankFailed(f"MPI rank {rank} on {host} failed: {reason}") from None


def launch_rank(
    spec: TaskSpec,
    rank: int,
    rows: Iterable,
    env: dict[str, str],
    runtime: MPIRuntime,
    gpus: list[str] | None = None,
) -> list:
    """Runs rank ``rank`` to completion and returns what it produced (run mode).

    ``env`` and ``runtime``'s variables are added to the rank's environment, whether the rank
    is a fresh process or a pre-started one; ``runtime``'s alone are what this worker's next
    pre-started interpreter is started with. ``gpus`` (the task's GPU addresses) are reported
    to the driver, which warns when ranks on one host share a GPU."""
    runtime_env = runtime.rank_env()
    env = {**runtime_env, **env}
    host = socket.gethostname()
    control = connect_control(spec, rank, host)
    try:
        if gpus:
            with contextlib.suppress(OSError):  # a closed link is noticed where it matters
                send(control, Kind.RESOURCES, {"gpu": list(gpus)})
        pmi_sock = _pmi_connect(spec, rank, host, control)
    except BaseException:
        control.close()
        raise
    become_subreaper()
    existed_before = children_now()
    ours, theirs = socket.socketpair()
    rank_env = child_env(env)
    rank_env.update(
        SPARKMPI_CHANNEL_FD=str(theirs.fileno()),
        SPARKMPI_PARENT_PID=str(os.getpid()),
        SPARKMPI_JOB_ID=spec.job_id,
        SPARKMPI_RANK=str(rank),
    )
    try:
        rank_env, pmi_fds, pmix_host = runtime.connect_rank_env(
            pmi_sock.fileno(), rank, spec.size, rank_env
        )
    except (HostFailed, OSError) as exc:  # the PMIx host of an Open MPI rank did not start
        pmi_sock.close()
        theirs.close()
        ours.close()
        reason = f"its MPI library's PMI could not start: {exc}"
        with contextlib.suppress(OSError):
            send(control, Kind.ERROR, {"rank": rank, "host": host, "reason": reason})
        control.close()
        raise RankFailed(f"MPI rank {rank} on {host} failed: {reason}") from None
    fds = (*pmi_fds, theirs.fileno())
    spare_fits = spec.prestart and len(pmi_fds) == 1  # a spare takes (PMI_FD, channel)
    command = [sys.executable, "-m", RANK_MODULE]
    try:
        proc = take_spare(rank_env, fds) if spare_fits else None
        if proc is None:
            proc = subprocess.Popen(
                command,
                env=rank_env,
                pass_fds=fds,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
    except BaseException:
        ours.close()
        control.close()
        if pmix_host is not None:
            pmix_host.close()
        raise
    finally:
        pmi_sock.close()
        theirs.close()
    try:
        supervisor = RankSupervisor(spec, rank, host, proc, ours, control, existed_before, env)
        return supervisor.run(rows)
    finally:
        if pmix_host is not None:
            pmix_host.close()
        if spare_fits:
            request_spare(command, runtime_env)


class RankSupervisor:
    """Watches one rank process and its three channels until it ends or must be killed."""

    def __init__(self, spec, rank, host, proc, chan, control, existed_before=frozenset(), env=None):
        self.spec, self.rank, self.host = spec, rank, host
        self.existed_before: frozenset[int] = frozenset(existed_before)
        self.proc: subprocess.Popen = proc
        self.chan: socket.socket = chan
        self.control: socket.socket = control
        self.control_lock = threading.Lock()
        self.results: list = []
        self.report: dict | None = None
        self.done = False
        self.feed_error: BaseException | None = None
        self.stderr_tail: deque[str] = deque(maxlen=STDERR_TAIL_LINES)
        self.partial = {"stdout": b"", "stderr": b""}
        self.sel: selectors.BaseSelector = selectors.DefaultSelector()
        relay = lambda stream, text: self.to_driver(Kind.OUTPUT, (stream, text))  # noqa: E731
        self.spawned = SpawnedProcesses(dict(env or {}), relay, self.sel)  # MPI_Comm_spawn's

    def to_driver(self, kind: Kind, obj: object = None, parts: Parts | None = None) -> None:
        with self.control_lock, contextlib.suppress(OSError):
            send_parts(self.control, kind, parts if parts is not None else encode(obj))

    def kill(self) -> None:
        """Kills the rank with everything it started, whatever session it is in; reaps them."""
        with spares_paused() as spares:
            kill_tree(self.proc.pid, self.existed_before, spares)
        self.proc.wait()
        self.spawned.close()

    def _spawn(self, request: dict) -> None:
        """Starts what a rank's ``MPI_Comm_spawn`` asked for; the driver answers the rank."""
        error = None
        try:
            self.spawned.start(request, self.spec.pmi, HANDSHAKE_TIMEOUT_S)
        except SpawnRefused as exc:
            error = str(exc)
        self.to_driver(Kind.SPAWNED, {"id": request["id"], "error": error})

    def _from_child(self, event: str, child: object) -> None:
        failure = self.spawned.on_event(event, child)
        if failure is not None:
            self.to_driver(Kind.ERROR, {"rank": self.rank, "host": self.host, **failure})

    # -- input ------------------------------------------------------------------------------
    def _feed(self, rows: Iterable) -> None:
        try:
            batch: list = []
            for row in rows:
                batch.append(row)
                if len(batch) >= ROWS_PER_FRAME:
                    send(self.chan, Kind.ROWS, batch)
                    batch = []
            if batch:
                send(self.chan, Kind.ROWS, batch)
            send(self.chan, Kind.END)
        except OSError:
            pass  # the rank stopped reading (it ended); its exit status tells the rest
        except BaseException as exc:
            self.feed_error = exc
            self.kill()

    # -- main loop --------------------------------------------------------------------------
    def run(self, rows: Iterable) -> list:
        pidfd = os.pidfd_open(self.proc.pid)
        sel = self.sel
        assert self.proc.stdout is not None and self.proc.stderr is not None
        sel.register(self.proc.stdout, selectors.EVENT_READ, "stdout")
        sel.register(self.proc.stderr, selectors.EVENT_READ, "stderr")
        sel.register(self.chan, selectors.EVENT_READ, "chan")
        sel.register(self.control, selectors.EVENT_READ, "control")
        sel.register(pidfd, selectors.EVENT_READ, "exit")
        try:
            send_parts(self.chan, Kind.JOB, Parts(self.spec.job, []))
            if self.spec.mode == "session":
                for _ in rows:  # sessions take no rows; Spark finishes faster once they are read
                    pass
            else:
                threading.Thread(target=self._feed, args=(rows,), daemon=True).start()
            exited = False
            while not exited:
                for key, _ in sel.select():
                    if isinstance(key.data, tuple):
                        self._from_child(*key.data)
                    elif key.data == "exit":
                        exited = True
                    elif key.data == "chan":
                        self._from_rank(sel)
                    elif key.data == "control":
                        self._from_driver()
                    else:
                        self._output(key.data, sel)
            # whatever the rank left running, in any session; its PID stays reserved until the
            # wait, so no other process can be mistaken for it
            self.kill()
            self._drain(sel)
            return self._finish()
        except BaseException:
            self.kill()
            raise
        finally:
            sel.close()
            os.close(pidfd)
            self.chan.close()
            self.control.close()
            for pipe in (self.proc.stdout, self.proc.stderr):
                pipe.close()

    def _output(self, stream: str, sel: selectors.BaseSelector) -> bool:
        pipe = self.proc.stdout if stream == "stdout" else self.proc.stderr
        data = os.read(pipe.fileno(), 65536)
        if not data:
            with contextlib.suppress(KeyError):
                sel.unregister(pipe)
            data = b"\n" if self.partial[stream] else b""
        text = self.partial[stream] + data
        complete, _, self.partial[stream] = text.rpartition(b"\n")
        if complete:
            lines = complete.decode(errors="replace")
            if stream == "stderr":
                self.stderr_tail.extend(lines.splitlines())
            self.to_driver(Kind.OUTPUT, (stream, lines + "\n"))
        return bool(data)

    def _from_rank(self, sel: selectors.BaseSelector) -> None:
        try:
            kind, parts = recv_parts(self.chan)
        except (EOFError, OSError):
            sel.unregister(self.chan)
            return
        if kind is Kind.ITEMS:
            self.results.extend(decode(parts))  # type: ignore[arg-type]
        elif kind is Kind.DONE:
            self.done = True
        elif kind is Kind.ERROR:
            self.report = decode(parts)  # type: ignore[assignment]
            self._report_now()
        elif kind in (Kind.READY, Kind.RESULT):
            self.to_driver(kind, parts=parts)

    def _from_driver(self) -> None:
        try:
            kind, parts = recv_parts(self.control)
        except (EOFError, OSError):
            self.kill()
            raise RankAborted(f"rank {self.rank}: lost the connection to the driver") from None
        if kind is Kind.ABORT:
            self.kill()
            raise RankAborted(f"rank {self.rank} killed: {decode(parts)}")
        if kind in (Kind.CALL, Kind.END):
            send_parts(self.chan, kind, parts)
        elif kind is Kind.SPAWN:
            self._spawn(decode(parts))  # type: ignore[arg-type]

    def _report_now(self) -> None:
        """Forwards the rank's own failure report while the rank waits to be killed."""
        report = {**(self.report or {}), "rank": self.rank, "host": self.host}
        report["stderr"] = "\n".join(self.stderr_tail)
        self.to_driver(Kind.ERROR, report)

    def _drain(self, sel: selectors.BaseSelector) -> None:
        """Reads what the dead rank left in its pipes and channel (for at most DRAIN_S)."""
        for key in list(sel.get_map().values()):
            if isinstance(key.data, tuple) or key.data in ("exit", "control"):
                sel.unregister(key.fileobj)
        deadline = time.monotonic() + DRAIN_S
        while sel.get_map() and (left := deadline - time.monotonic()) > 0:
            for key, _ in sel.select(left):
                if key.data == "chan":
                    self._from_rank(sel)
                else:
                    self._output(key.data, sel)

    def _finish(self) -> list:
        code = self.proc.returncode
        if code == 0 and self.done and self.feed_error is None:
            self.to_driver(Kind.FINISHED)
            return self.results
        report = dict(self.report or {})
        report.setdefault("rank", self.rank)
        if self.feed_error is not None:
            report["reason"] = f"reading its input failed: {self.feed_error!r}"
        elif "reason" not in report:
            if code < 0:
                report["reason"] = f"killed by signal {signal.Signals(-code).name}"
            else:
                report["reason"] = f"exited with status {code} before finishing"
        report["host"] = self.host
        report["exitcode"] = code
        report["stderr"] = "\n".join(self.stderr_tail)
        self.to_driver(Kind.ERROR, report)
        raise RankFailed(f"MPI rank {self.rank} on {self.host} failed: {report['reason']}")
