"""The driver's side of every running MPI job: PMI server plus a control channel to each task.

Each Spark task that starts a rank keeps one control connection here. Over it the driver
learns what the rank printed, whether it finished or failed (with its traceback), and, for
sessions, its results; and it tells the task to kill its rank when another rank has failed.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from sparkmpi.pmi import AbortRequest, ListenerLimits, PMIJob, PMIServer
from sparkmpi.pmi.auth import CONTROL_PURPOSE, acceptance_line, authenticate_peer, refusal_line
from sparkmpi.pmi.listener import GuardedListener
from sparkmpi.pmi.server import SpawnAnswer
from sparkmpi.pmi.spawn import SpawnRequest
from sparkmpi.runner.frames import Kind, Parts, decode, encode, read_parts, write_parts
from sparkmpi.runner.resources import shared_gpus, sharing_warning

log = logging.getLogger(__name__)

OutputSink = Callable[[int, str, str], None]


class Spawner(Protocol):
    """Starts a spawn's processes elsewhere than beside the parent rank (on executors)."""

    def wants(self, size: int) -> bool: ...

    def release(self, size: int) -> None: ...

    def launch(
        self, parent: JobState, rank: int, child: PMIJob, frame: dict, answer: SpawnAnswer
    ) -> None: ...


TASK_LOST = "its Spark task was lost (the task, its Python worker or its executor ended)"


def print_prefixed(rank: int, stream: str, text: str) -> None:
    """Writes a rank's output to the driver's stdout/stderr, each line prefixed ``[rank N]``."""
    target = sys.stderr if stream == "stderr" else sys.stdout
    for line in text.splitlines():
        target.write(f"[rank {rank}] {line}\n")
    target.flush()


@dataclass
class JobState:
    """What the driver knows about one running job."""

    pmi: PMIJob
    output: OutputSink | None
    failures: list[dict] = field(default_factory=list)
    failed: threading.Event = field(default_factory=threading.Event)
    finished: set[int] = field(default_factory=set)
    ready: set[int] = field(default_factory=set)
    all_ready: threading.Event = field(default_factory=threading.Event)
    results: dict[int, object] = field(default_factory=dict)
    results_done: threading.Event = field(default_factory=threading.Event)
    links: dict[int, asyncio.StreamWriter] = field(default_factory=dict)
    hosts: dict[int, str] = field(default_factory=dict)
    gpus: dict[int, list[str]] = field(default_factory=dict)
    spawned_jobs: list[str] = field(default_factory=list)
    spawn_answers: dict[int, SpawnAnswer] = field(default_factory=dict)
    spawner: Spawner | None = None
    parent: tuple[JobState, int] | None = None
    children: list[JobState] = field(default_factory=list)
    closed: bool = False
    changed: threading.Event = field(default_factory=threading.Event)

    @property
    def job_id(self) -> str:
        return self.pmi.job_id

    @property
    def size(self) -> int:
        return self.pmi.size

    @property
    def secret(self) -> str:
        return self.pmi.secret


class DriverHub:
    """PMI server and control listener of this driver, each on its own thread.

    ``host`` is the address both bind, ``advertise`` the one tasks are told to connect to;
    ``limits`` bounds unauthenticated peers and sets how long a silent peer keeps its link.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        pmi_port: int = 0,
        control_port: int = 0,
        advertise: str | None = None,
        limits: ListenerLimits | None = None,
    ):
        self.limits = limits or ListenerLimits()
        self.pmi = PMIServer(host, pmi_port, advertise, self.limits)
        self.advertise = advertise or host
        self.jobs: dict[str, JobState] = {}
        self._thread = GuardedListener(
            "sparkmpi-control", host, control_port, self._authenticate, self._converse, self.limits
        )

    def start(self) -> DriverHub:
        """Starts both listeners; returns ``self``."""
        self.pmi.start()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._thread.stop()
        self.pmi.stop()

    @property
    def address(self) -> tuple[str, int]:
        """Where tasks open their control link."""
        return self.advertise, self._thread.port

    @property
    def listener(self) -> GuardedListener:
        """The control port's guard: refusal counts, connections still authenticating."""
        return self._thread

    def _call(self, fn: Callable[[], None]) -> None:
        self._thread.call(fn)

    # -- jobs -------------------------------------------------------------------------------
    def create_job(
        self, size: int, output: OutputSink | None = print_prefixed, pmi_job: PMIJob | None = None
    ) -> JobState:
        """Registers a job of ``size`` ranks in the PMI server and here (``pmi_job``: one the
        PMI server already has, a spawned job's)."""
        if pmi_job is not None:
            job = JobState(pmi=pmi_job, output=output)
            self.jobs[job.job_id] = job
            return job
        holder: dict[str, JobState] = {}

        def on_abort(job_id: str, request: AbortRequest) -> None:
            message = request.message or "no message"
            self.fail(
                holder["job"],
                {
                    "rank": request.rank,
                    "reason": f"MPI_Abort with exit code {request.exitcode}: {message}",
                },
            )

        def on_spawn(job_id: str, rank: int, request: SpawnRequest, answer) -> None:
            self._spawn(holder["job"], rank, request, answer)

        pmi_job = self.pmi.create_job(size, on_abort=on_abort, on_spawn=on_spawn)
        job = holder["job"] = JobState(pmi=pmi_job, output=output)
        self.jobs[job.job_id] = job
        return job

    def _spawn(self, job: JobState, rank: int, request: SpawnRequest, answer) -> None:
        """A new PMI job for what rank ``rank`` spawns, started by the job's spawner on executors
        when it wants them, else by the rank's task beside the rank, which answers over its
        control link (:meth:`_on_spawned`)."""

        def on_child_abort(child_id: str, request: AbortRequest) -> None:
            message = request.message or "no message"
            reason = (
                f"process {request.rank} it spawned called MPI_Abort with exit code "
                f"{request.exitcode}: {message}"
            )
            self.fail(job, {"rank": rank, "reason": reason})

        spawner = job.spawner if job.spawner and job.spawner.wants(request.size) else None
        child = self.pmi.create_job(
            request.size,
            on_abort=on_child_abort,
            preput=request.preput,
            appnums=request.appnums(),
        )
        frame = {
            "job_id": child.job_id,
            "secret": child.secret,
            "size": child.size,
            "commands": [
                {"execname": c.execname, "nprocs": c.nprocs, "argv": c.argv, "info": c.info}
                for c in request.commands
            ],
        }

        def send() -> None:
            writer = job.links.get(rank)
            if job.failed.is_set() or job.closed or writer is None or writer.is_closing():
                answer("the job is ending")
                self.pmi.close_job(child.job_id)
                if spawner is not None:
                    spawner.release(request.size)
                return
            job.spawned_jobs.append(child.job_id)
            if spawner is not None:
                spawner.launch(job, rank, child, frame, answer)
                return
            frame["id"] = spawn_id = len(job.spawned_jobs)
            job.spawn_answers[spawn_id] = answer
            self._send(writer, Kind.SPAWN, frame)

        self._call(send)

    def _on_spawned(self, job: JobState, reply: object) -> None:
        if not isinstance(reply, dict):
            return
        answer = job.spawn_answers.pop(reply.get("id"), None)  # type: ignore[arg-type]
        if answer is not None:
            error = reply.get("error")
            answer(None if error is None else str(error))

    def close_job(self, job: JobState) -> None:
        """Forgets ``job``: its PMI space and control links are closed."""
        job.closed = True
        job.all_ready.set()  # whoever waits for the ranks to start: they never will now
        self.pmi.close_job(job.job_id)
        for child_id in job.spawned_jobs:
            self.pmi.close_job(child_id)
        for child in job.children:
            if not child.closed:
                self.close_job(child)

        def close() -> None:
            for writer in job.links.values():
                writer.close()

        self._call(close)
        self.jobs.pop(job.job_id, None)

    def fail(self, job: JobState, report: dict) -> None:
        """Records a failure; the first one tells every task of the job to kill its rank."""
        self._call(lambda: self._fail(job, report))

    def _fail(self, job: JobState, report: dict) -> None:
        if report.get("rank") in job.hosts and not report.get("host"):
            report = {**report, "host": job.hosts[report["rank"]]}
        job.failures.append(report)
        if job.failed.is_set():
            return
        job.failed.set()
        job.changed.set()
        job.results_done.set()
        job.all_ready.set()
        reason = f"rank {report.get('rank')} failed: {report.get('reason')}"
        for writer in job.links.values():
            self._send(writer, Kind.ABORT, reason)
        for child in job.children:
            self._fail(child, {"rank": None, "reason": "the job that spawned it failed"})
        # a spawn whose processes did not all start is answered with an error instead
        started = len(job.ready) == job.size
        if job.parent is not None and started and report.get("rank") is not None:
            parent, rank = job.parent
            what = report.get("reason")
            if not str(what).startswith("process "):
                what = f"process {report['rank']} it spawned failed: {what}"
            where = f" (on {report['host']})" if report.get("host") else ""
            self._fail(parent, {"rank": rank, "reason": f"{what}{where}", **_tail(report)})

    def _send(self, writer: asyncio.StreamWriter, kind: Kind, obj: object) -> None:
        if not writer.is_closing():
            write_parts(writer, kind, encode(obj))

    def broadcast(self, job: JobState, kind: Kind, payloads: list[Parts] | None) -> None:
        """Sends ``payloads[r]`` (or an empty frame) to the task of each rank ``r``."""
        if kind is Kind.CALL:
            job.results = {}
            job.results_done.clear()

        def send() -> None:
            for rank, writer in job.links.items():
                if not writer.is_closing():
                    write_parts(writer, kind, payloads[rank] if payloads else encode(None))

        self._call(send)

    # -- control connections ----------------------------------------------------------------
    async def _authenticate(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        verified = await authenticate_peer(self._thread, reader, writer, CONTROL_PURPOSE, self.jobs)
        if verified is None:
            return None
        claims, job = verified
        rank = claims.rank
        if job.failed.is_set() or job.closed or rank in job.links or not 0 <= rank < job.size:
            why = f"rank {rank} may not join job {claims.job} now"
            self._thread.refuse(writer, why, "refused by job")
            writer.write(refusal_line(why))
            return None
        job.links[rank] = writer
        job.hosts[rank] = claims.host
        writer.write(acceptance_line(job.secret, CONTROL_PURPOSE, claims))
        await writer.drain()
        return job, rank

    async def _converse(
        self,
        session: tuple[JobState, int],
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        job, rank = session
        reason = TASK_LOST
        try:
            while True:
                kind, parts = await read_parts(reader)
                self._on_frame(job, rank, kind, parts)
                if kind is Kind.FINISHED:
                    job.finished.add(rank)
        except asyncio.IncompleteReadError:
            pass
        except TimeoutError:  # ETIMEDOUT: keepalive or TCP_USER_TIMEOUT gave up on the peer
            reason = (
                f"its node stopped answering: no reply from {job.hosts.get(rank)} for "
                f"{self.limits.link_timeout:g} s (network down or host frozen)"
            )
        except OSError:
            pass
        except ValueError:
            reason = "its Spark task sent a corrupt frame"
        finally:
            job.links.pop(rank, None)
            if rank not in job.finished and not job.closed:
                self._fail(job, {"rank": rank, "reason": reason})

    def _on_frame(self, job: JobState, rank: int, kind: Kind, parts: Parts) -> None:
        if kind is Kind.OUTPUT:
            if job.output is not None:
                stream, text = decode(parts)  # type: ignore[misc]
                job.output(rank, stream, text)
        elif kind is Kind.ERROR:
            report = decode(parts)
            self._fail(job, report if isinstance(report, dict) else {"rank": rank})
        elif kind is Kind.READY:
            job.ready.add(rank)
            if len(job.ready) == job.size:
                job.all_ready.set()
        elif kind is Kind.RESULT:
            _, value = decode(parts)  # type: ignore[misc]
            job.results[rank] = value
            if len(job.results) == job.size:
                job.results_done.set()
        elif kind is Kind.RESOURCES:
            self._on_gpus(job, rank, decode(parts))
        elif kind is Kind.SPAWNED:
            self._on_spawned(job, decode(parts))

    def _on_gpus(self, job: JobState, rank: int, resources: object) -> None:
        """Records rank ``rank``'s GPU addresses; once every rank's are in, prints one warning
        line to stderr if ranks on one host share a GPU."""
        if not isinstance(resources, dict) or rank in job.gpus:
            return
        job.gpus[rank] = [str(address) for address in resources.get("gpu", ())]
        if len(job.gpus) == job.size:
            shared = shared_gpus(job.hosts, job.gpus)
            if shared:
                print(sharing_warning(job.job_id, shared), file=sys.stderr, flush=True)


def _tail(report: dict) -> dict:
    return {"stderr": report["stderr"]} if report.get("stderr") else {}


_hubs: dict[tuple, DriverHub] = {}
_hubs_lock = threading.Lock()


def get_hub(
    host: str = "127.0.0.1",
    pmi_port: int = 0,
    control_port: int = 0,
    advertise: str | None = None,
    limits: ListenerLimits | None = None,
) -> DriverHub:
    """The hub of this driver process bound to ``host`` with these settings (started on first
    use, then shared by every job that asks for the same)."""
    key = (host, pmi_port, control_port, advertise, limits)
    with _hubs_lock:
        hub = _hubs.get(key)
        if hub is None:
            hub = _hubs[key] = DriverHub(host, pmi_port, control_port, advertise, limits).start()
        return hub
