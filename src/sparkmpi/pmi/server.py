"""The PMI-1 server: an asyncio transport around :class:`~sparkmpi.pmi.job.PMIJob` state machines.

Access control: MPI never dials this server itself. The process that starts a rank (the Spark
task) connects, answers the server's challenge with an HMAC of the job's secret
(:mod:`sparkmpi.pmi.auth`), checks the server's proof, and then hands the admitted socket to
the MPI process as its inherited ``PMI_FD``. A connection that does not authenticate within
the listener's deadline and line limit, or answers wrongly, is refused and closed; other
connections and jobs are unaffected (:mod:`sparkmpi.pmi.listener`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import threading
from collections.abc import Callable

from sparkmpi.pmi.auth import PMI_PURPOSE, acceptance_line, authenticate_peer, refusal_line
from sparkmpi.pmi.job import SPAWN_UNSUPPORTED, AbortRequest, JobRefused, PMIJob, Reply
from sparkmpi.pmi.listener import GuardedListener, ListenerLimits
from sparkmpi.pmi.protocol import (
    MAX_LINE,
    MCMD_END,
    MCMD_MAX_LINES,
    PMIProtocolError,
    error_reply,
    format_command,
    parse_command,
    parse_mcmd,
)
from sparkmpi.pmi.spawn import SpawnRequest

log = logging.getLogger(__name__)

AbortCallback = Callable[[str, AbortRequest], None]
LostCallback = Callable[[str, int], None]
SpawnAnswer = Callable[[str | None], None]
"""Answers a rank's spawn: None once the children are started, else why they are not."""
SpawnCallback = Callable[[str, int, SpawnRequest, SpawnAnswer], None]


class PMIServer:
    """A PMI-1 key-value server for many concurrent jobs, running on its own thread.

    ``host`` is the address to bind (loopback by default); ``advertise`` is the address that
    clients are told to connect to (defaults to ``host``). ``port=0`` picks a free port.
    ``limits`` bounds what unauthenticated peers may cost (:class:`ListenerLimits`).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        advertise: str | None = None,
        limits: ListenerLimits | None = None,
    ):
        self.host, self.port = host, port
        self.advertise = advertise or host
        self.names: dict[str, str] = {}
        self._jobs: dict[str, PMIJob] = {}
        self._on_abort: dict[str, AbortCallback] = {}
        self._on_lost: dict[str, LostCallback] = {}
        self._on_spawn: dict[str, SpawnCallback] = {}
        self._writers: dict[str, dict[int, asyncio.StreamWriter]] = {}
        self._lock = threading.Lock()
        self._thread = GuardedListener(
            "sparkmpi-pmi", host, port, self._authenticate, self._converse, limits
        )

    # -- life cycle -------------------------------------------------------------------------
    def start(self) -> PMIServer:
        """Starts listening (idempotent); returns ``self`` once the port is bound."""
        with self._lock:
            if not self._thread.running:
                self._thread.start()
                self.port = self._thread.port
        return self

    def stop(self) -> None:
        """Closes every connection and stops the server thread."""
        if not self._thread.running:
            return
        self._thread.run(lambda: [self._drop_job(job_id) for job_id in list(self._jobs)])
        self._thread.stop()

    def __enter__(self) -> PMIServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` that clients connect to."""
        return self.advertise, self.port

    @property
    def listener(self) -> GuardedListener:
        """The listening socket's guard: refusal counts, connections still authenticating."""
        return self._thread

    @property
    def refused(self) -> int:
        """Connections refused so far (before or after authentication)."""
        return self._thread.refusals.total

    # -- jobs (thread-safe) -----------------------------------------------------------------
    def create_job(
        self,
        size: int,
        *,
        on_abort: AbortCallback | None = None,
        on_lost: LostCallback | None = None,
        on_spawn: SpawnCallback | None = None,
        preput: dict[str, str] | None = None,
        appnums: list[int] | None = None,
    ) -> PMIJob:
        """A new job of ``size`` ranks with its own kvsname and a fresh secret.

        ``on_abort(job_id, request)`` runs when a rank calls ``PMI_Abort``; ``on_lost(job_id,
        rank)`` when a rank's connection ends before it finalized; ``on_spawn(job_id, rank,
        request, answer)`` when a rank calls ``MPI_Comm_spawn`` (without it the spawn is
        refused with an error); the rank gets its reply when ``answer`` is called, from any
        thread. All run on the server thread and must not block. ``preput`` fills the KVS
        before any rank joins and ``appnums`` gives each rank's ``MPI_APPNUM`` (spawned jobs).
        """
        job = PMIJob(
            job_id=secrets.token_hex(6),
            size=size,
            secret=secrets.token_hex(16),
            kvs=dict(preput or {}),
            appnums=appnums,
        )
        with self._lock:
            self._jobs[job.job_id] = job
            self._writers[job.job_id] = {}
            if on_abort:
                self._on_abort[job.job_id] = on_abort
            if on_lost:
                self._on_lost[job.job_id] = on_lost
            if on_spawn:
                self._on_spawn[job.job_id] = on_spawn
        return job

    def close_job(self, job_id: str) -> None:
        """Ends a job: its connections are closed and no rank may join it any more."""
        self._thread.run(lambda: self._drop_job(job_id))

    def _drop_job(self, job_id: str) -> None:
        with self._lock:
            job = self._jobs.pop(job_id, None)
            writers = self._writers.pop(job_id, {})
            self._on_abort.pop(job_id, None)
            self._on_lost.pop(job_id, None)
            self._on_spawn.pop(job_id, None)
        if job is not None:
            job.closed = True
        for writer in writers.values():
            writer.close()

    # -- transport --------------------------------------------------------------------------
    async def _authenticate(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> tuple[PMIJob, int] | None:
        verified = await authenticate_peer(self._thread, reader, writer, PMI_PURPOSE, self._jobs)
        if verified is None:
            return None
        claims, job = verified
        try:
            released = job.admit(claims.rank, claims.host)
        except JobRefused as exc:
            self._thread.refuse(writer, str(exc), "refused by job")
            writer.write(refusal_line(str(exc)))
            return None
        self._writers[job.job_id][claims.rank] = writer
        writer.write(acceptance_line(job.secret, PMI_PURPOSE, claims, kvsname=job.kvsname))
        await self._deliver(job, released)
        return job, claims.rank

    async def _read_command(self, reader: asyncio.StreamReader):
        try:
            line = await reader.readline()
        except (asyncio.LimitOverrunError, ValueError):
            raise PMIProtocolError(f"line longer than {MAX_LINE} bytes") from None
        if not line:
            return None
        if not line.endswith(b"\n"):
            raise PMIProtocolError("connection ended inside a line")
        if line.startswith(b"mcmd="):
            return await self._read_mcmd(reader, line)
        return parse_command(line)

    async def _read_mcmd(self, reader: asyncio.StreamReader, first: bytes):
        """The rest of a multi-line ``mcmd=`` block, parsed; at most MCMD_MAX_LINES lines."""
        lines = [first]
        end = MCMD_END.encode()
        while lines[-1].rstrip(b"\r\n") != end and len(lines) <= MCMD_MAX_LINES + 1:
            try:
                line = await reader.readline()
            except (asyncio.LimitOverrunError, ValueError):
                raise PMIProtocolError(f"line longer than {MAX_LINE} bytes") from None
            if not line.endswith(b"\n"):
                raise PMIProtocolError("connection ended inside an mcmd block")
            lines.append(line)
        try:
            text = [line.decode("utf-8").rstrip("\n").rstrip("\r") for line in lines]
        except UnicodeDecodeError:
            raise PMIProtocolError("mcmd block is not UTF-8 text") from None
        return parse_mcmd(text)

    async def _refuse(self, writer: asyncio.StreamWriter, cmd: str, why: str) -> None:
        self._thread.refuse(writer, why, "protocol error")
        writer.write(error_reply(cmd, why.replace(" ", "_")).encode())
        with contextlib.suppress(ConnectionError):
            await writer.drain()

    async def _converse(
        self,
        session: tuple[PMIJob, int],
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        job, rank = session
        try:
            await self._conversation(job, rank, reader, writer)
        finally:
            self._left(job, rank, writer)

    async def _conversation(
        self, job: PMIJob, rank: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        while not job.closed:
            try:
                command = await self._read_command(reader)
            except PMIProtocolError as exc:
                await self._refuse(writer, "error", f"malformed: {exc}")
                return
            if command is None:
                return
            replies = job.handle(rank, command, self.names)
            if command.cmd == "abort" and job.abort is not None:
                callback = self._on_abort.get(job.job_id)
                if callback:
                    callback(job.job_id, job.abort)
            while job.spawns:
                self._spawn(job, *job.spawns.pop(0))
            if any(r.close for r in replies):
                self._thread.refuse(writer, f"rank {rank} sent a bad {command.cmd}", "bad command")
            await self._deliver(job, replies)
            if any(r.close and r.rank == rank for r in replies):
                return

    def _spawn(self, job: PMIJob, rank: int, request: SpawnRequest) -> None:
        loop = asyncio.get_running_loop()

        def answer(error: str | None) -> None:
            line = (
                format_command("spawn_result", rc=0)
                if error is None
                else error_reply("spawn", error.replace(" ", "_"))
            )
            reply = Reply(rank, line)
            loop.call_soon_threadsafe(lambda: loop.create_task(self._deliver(job, [reply])))

        callback = self._on_spawn.get(job.job_id)
        if callback is None:
            answer(SPAWN_UNSUPPORTED)
            return
        try:
            callback(job.job_id, rank, request, answer)
        except Exception as exc:  # the rank must get an answer whatever the launcher did
            log.exception("spawn callback failed")
            answer(f"spawn failed: {exc}")

    async def _deliver(self, job: PMIJob, replies: list[Reply]) -> None:
        writers = self._writers.get(job.job_id, {})
        touched = []
        for reply in replies:
            target = writers.get(reply.rank)
            if target is None or target.is_closing():
                continue
            target.write(reply.line.encode())
            touched.append(target)
        for target in touched:
            with contextlib.suppress(ConnectionError):
                await target.drain()

    def _left(self, job: PMIJob, rank: int, writer: asyncio.StreamWriter) -> None:
        writers = self._writers.get(job.job_id, {})
        if writers.get(rank) is writer:
            del writers[rank]
        if not job.closed and rank not in job.finalized:
            callback = self._on_lost.get(job.job_id)
            if callback:
                callback(job.job_id, rank)
