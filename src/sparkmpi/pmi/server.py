"""The PMI-1 server: an asyncio transport around :class:`~sparkmpi.pmi.job.PMIJob` state machines.

Access control: MPI never dials this server itself. The process that starts a rank (the Spark
task) connects, proves membership with the job's secret in a first ``cmd=auth`` line, and then
hands the authenticated socket to the MPI process as its inherited ``PMI_FD``. A connection
whose first line is anything else, or whose secret is wrong, is answered with ``rc=-1`` and
closed; other connections and jobs are unaffected.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import secrets
import threading
from collections.abc import Callable

from sparkmpi.pmi.job import AbortRequest, JobRefused, PMIJob, Reply
from sparkmpi.pmi.protocol import (
    MAX_LINE,
    PMIProtocolError,
    error_reply,
    format_command,
    parse_command,
)
from sparkmpi.pmi.threaded import ServerThread

log = logging.getLogger(__name__)

AbortCallback = Callable[[str, AbortRequest], None]
LostCallback = Callable[[str, int], None]


class PMIServer:
    """A PMI-1 key-value server for many concurrent jobs, running on its own thread.

    ``host`` is the address to bind (loopback by default); ``advertise`` is the address that
    clients are told to connect to (defaults to ``host``). ``port=0`` picks a free port.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, advertise: str | None = None):
        self.host, self.port = host, port
        self.advertise = advertise or host
        self.names: dict[str, str] = {}
        self.refused = 0
        self._jobs: dict[str, PMIJob] = {}
        self._on_abort: dict[str, AbortCallback] = {}
        self._on_lost: dict[str, LostCallback] = {}
        self._writers: dict[str, dict[int, asyncio.StreamWriter]] = {}
        self._lock = threading.Lock()
        self._thread = ServerThread(self._serve, host, port, MAX_LINE, "sparkmpi-pmi")

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

    # -- jobs (thread-safe) -----------------------------------------------------------------
    def create_job(
        self,
        size: int,
        *,
        on_abort: AbortCallback | None = None,
        on_lost: LostCallback | None = None,
    ) -> PMIJob:
        """A new job of ``size`` ranks with its own kvsname and a fresh secret.

        ``on_abort(job_id, request)`` runs when a rank calls ``PMI_Abort``; ``on_lost(job_id,
        rank)`` when a rank's connection ends before it finalized. Both run on the server
        thread and must not block.
        """
        job = PMIJob(job_id=secrets.token_hex(6), size=size, secret=secrets.token_hex(16))
        with self._lock:
            self._jobs[job.job_id] = job
            self._writers[job.job_id] = {}
            if on_abort:
                self._on_abort[job.job_id] = on_abort
            if on_lost:
                self._on_lost[job.job_id] = on_lost
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
        if job is not None:
            job.closed = True
        for writer in writers.values():
            writer.close()

    # -- transport --------------------------------------------------------------------------
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        joined: tuple[PMIJob, int] | None = None
        try:
            joined = await self._authenticate(reader, writer)
            if joined is not None:
                await self._converse(joined[0], joined[1], reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            if joined is not None:
                self._left(*joined, writer)

    async def _read_command(self, reader: asyncio.StreamReader):
        try:
            line = await reader.readline()
        except (asyncio.LimitOverrunError, ValueError):
            raise PMIProtocolError(f"line longer than {MAX_LINE} bytes") from None
        if not line:
            return None
        if not line.endswith(b"\n"):
            raise PMIProtocolError("connection ended inside a line")
        return parse_command(line)

    async def _refuse(self, writer: asyncio.StreamWriter, cmd: str, why: str) -> None:
        self.refused += 1
        log.warning("PMI connection refused: %s", why)
        writer.write(error_reply(cmd, why.replace(" ", "_")).encode())
        with contextlib.suppress(ConnectionError):
            await writer.drain()

    async def _authenticate(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> tuple[PMIJob, int] | None:
        try:
            command = await self._read_command(reader)
        except PMIProtocolError as exc:
            await self._refuse(writer, "error", f"malformed: {exc}")
            return None
        if command is None:
            return None
        if command.cmd != "auth":
            await self._refuse(writer, command.cmd, "not authenticated (send cmd=auth first)")
            return None
        try:
            job_id, secret = command.require("job"), command.require("secret")
            rank, host = command.require_int("rank"), command.require("host")
        except PMIProtocolError as exc:
            await self._refuse(writer, "auth", str(exc))
            return None
        job = self._jobs.get(job_id)
        if job is None or not hmac.compare_digest(secret.encode(), job.secret.encode()):
            await self._refuse(writer, "auth", "unknown job or wrong secret")
            return None
        try:
            released = job.admit(rank, host)
        except JobRefused as exc:
            await self._refuse(writer, "auth", str(exc))
            return None
        self._writers[job_id][rank] = writer
        writer.write(format_command("auth_result", rc=0, kvsname=job.kvsname).encode())
        await self._deliver(job, released)
        return job, rank

    async def _converse(
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
            if any(r.close for r in replies):
                self.refused += 1
            await self._deliver(job, replies)
            if any(r.close and r.rank == rank for r in replies):
                return

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
