"""One MPI job's PMI state: its KVS, barrier, members and hosts, as a pure state machine.

:meth:`PMIJob.handle` takes a parsed command from one rank and returns the lines to send and to
whom; the transport (:mod:`sparkmpi.pmi.server`) only moves bytes. Replies that must wait (the
barrier, and ``PMI_process_mapping`` until every rank has said where it runs) are released by
the call that completes them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sparkmpi.pmi.mapping import process_mapping
from sparkmpi.pmi.protocol import (
    KEYLEN_MAX,
    KVSNAME_MAX,
    VALLEN_MAX,
    PMICommand,
    PMIProtocolError,
    abort_message,
    error_reply,
    format_command,
)
from sparkmpi.pmi.spawn import SpawnCollector, SpawnRequest

MAPPING_KEY = "PMI_process_mapping"


SPAWN_UNSUPPORTED = "MPI_Comm_spawn_is_not_available_here:_start_all_ranks_at_once"


class JobRefused(Exception):
    """A connection that may not join this job (wrong rank, rank taken, job over)."""


@dataclass(frozen=True)
class Reply:
    """A line for ``rank``; ``close`` asks the transport to drop that connection after it."""

    rank: int
    line: str
    close: bool = False


@dataclass(frozen=True)
class AbortRequest:
    """What a rank's ``PMI_Abort`` said."""

    rank: int
    exitcode: int
    message: str


@dataclass
class PMIJob:
    """The PMI key-value space of one job of ``size`` ranks."""

    job_id: str
    size: int
    secret: str
    kvsname: str = ""
    hosts: dict[int, str] = field(default_factory=dict)
    kvs: dict[str, str] = field(default_factory=dict)
    finalized: set[int] = field(default_factory=set)
    abort: AbortRequest | None = None
    closed: bool = False
    appnums: list[int] | None = None
    spawns: list[tuple[int, SpawnRequest]] = field(default_factory=list)
    _collectors: dict[int, SpawnCollector] = field(default_factory=dict)
    _barrier: set[int] = field(default_factory=set)
    _waiting_for_mapping: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"a job needs at least one rank, got size={self.size}")
        self.kvsname = self.kvsname or f"sparkmpi_{self.job_id}"
        if len(self.kvsname) >= KVSNAME_MAX:
            raise ValueError("kvsname too long")

    @property
    def complete(self) -> bool:
        """Every rank has joined and said which host it runs on."""
        return len(self.hosts) == self.size

    def mapping(self) -> str:
        return process_mapping([self.hosts[r] for r in range(self.size)])

    def admit(self, rank: int, host: str) -> list[Reply]:
        """Registers ``rank`` as running on ``host``; :class:`JobRefused` if it may not join."""
        if self.closed:
            raise JobRefused(f"job {self.job_id} is over")
        if not 0 <= rank < self.size:
            raise JobRefused(f"rank {rank} is outside job {self.job_id} of size {self.size}")
        if rank in self.hosts:
            raise JobRefused(f"rank {rank} of job {self.job_id} has already joined")
        if not host or " " in host:
            raise JobRefused(f"invalid host name {host!r}")
        self.hosts[rank] = host
        if not self.complete:
            return []
        waiting, self._waiting_for_mapping = self._waiting_for_mapping, []
        return [self._mapping_reply(r) for r in waiting]

    def _mapping_reply(self, rank: int) -> Reply:
        return Reply(rank, format_command("get_result", rc=0, value=self.mapping()))

    def handle(self, rank: int, command: PMICommand, names: dict[str, str]) -> list[Reply]:
        """The replies ``command`` from ``rank`` causes; ``names`` is the server's name service.

        Unknown commands and malformed arguments get an error reply (``rc=-1``); the rank's
        connection stays open, so its MPI library reports an error instead of crashing.
        """
        handler = getattr(self, f"_cmd_{command.cmd}", None)
        if handler is None:
            return [Reply(rank, error_reply(command.cmd, f"unknown_command_{command.cmd}"))]
        try:
            return handler(rank, command, names)
        except PMIProtocolError as exc:
            return [Reply(rank, error_reply(command.cmd, str(exc).replace(" ", "_")))]

    def _one(self, rank: int, cmd: str, **kwargs: object) -> list[Reply]:
        return [Reply(rank, format_command(cmd, rc=0, **kwargs))]

    def _cmd_init(self, rank: int, c: PMICommand, names: dict[str, str]) -> list[Reply]:
        if c.require_int("pmi_version") != 1:
            return [Reply(rank, error_reply("init", "only_PMI_version_1_is_served"), True)]
        return self._one(rank, "response_to_init", pmi_version=1, pmi_subversion=1)

    def _cmd_initack(self, rank: int, c: PMICommand, names: dict[str, str]) -> list[Reply]:
        if c.require_int("pmiid") != rank:
            return [Reply(rank, error_reply("initack", "pmiid_does_not_match_this_rank"), True)]
        lines = [
            format_command("initack"),
            format_command("set", size=self.size),
            format_command("set", rank=rank),
            format_command("set", debug=0),
        ]
        return [Reply(rank, "".join(lines))]

    def _cmd_get_maxes(self, rank: int, c: PMICommand, names: dict[str, str]) -> list[Reply]:
        return self._one(
            rank, "maxes", kvsname_max=KVSNAME_MAX, keylen_max=KEYLEN_MAX, vallen_max=VALLEN_MAX
        )

    def _cmd_get_appnum(self, rank: int, c: PMICommand, names: dict[str, str]) -> list[Reply]:
        return self._one(rank, "appnum", appnum=self.appnums[rank] if self.appnums else 0)

    def _cmd_get_my_kvsname(self, rank: int, c: PMICommand, names: dict[str, str]) -> list[Reply]:
        return self._one(rank, "my_kvsname", kvsname=self.kvsname)

    def _cmd_get_universe_size(
        self, rank: int, c: PMICommand, names: dict[str, str]
    ) -> list[Reply]:
        return self._one(rank, "universe_size", size=self.size)

    def _check_kvsname(self, c: PMICommand) -> None:
        name = c.get("kvsname")
        if name is not None and name != self.kvsname:
            raise PMIProtocolError(f"kvsname {name} is not this job's")

    def _cmd_put(self, rank: int, c: PMICommand, names: dict[str, str]) -> list[Reply]:
        self._check_kvsname(c)
        key, value = c.require("key"), c.require("value")
        if len(key) > KEYLEN_MAX or len(value) > VALLEN_MAX:
            raise PMIProtocolError("key or value too long")
        if key == MAPPING_KEY:
            raise PMIProtocolError(f"{MAPPING_KEY} is set by the server")
        self.kvs[key] = value
        return self._one(rank, "put_result")

    def _cmd_get(self, rank: int, c: PMICommand, names: dict[str, str]) -> list[Reply]:
        self._check_kvsname(c)
        key = c.require("key")
        if key == MAPPING_KEY:
            if self.complete:
                return [self._mapping_reply(rank)]
            self._waiting_for_mapping.append(rank)
            return []
        if key in self.kvs:
            return self._one(rank, "get_result", value=self.kvs[key])
        return [Reply(rank, format_command("get_result", rc=-1, msg="key_not_found"))]

    def _cmd_barrier_in(self, rank: int, c: PMICommand, names: dict[str, str]) -> list[Reply]:
        self._barrier.add(rank)
        if len(self._barrier) < self.size:
            return []
        members, self._barrier = sorted(self._barrier), set()
        line = format_command("barrier_out", rc=0)
        return [Reply(r, line) for r in members]

    def _cmd_finalize(self, rank: int, c: PMICommand, names: dict[str, str]) -> list[Reply]:
        self.finalized.add(rank)
        return self._one(rank, "finalize_ack")

    def _cmd_abort(self, rank: int, c: PMICommand, names: dict[str, str]) -> list[Reply]:
        code = c.get("exitcode") or "1"
        exitcode = int(code) if code.lstrip("-").isdigit() else 1
        if self.abort is None:
            self.abort = AbortRequest(rank, exitcode, abort_message(c))
        return []

    def _cmd_publish_name(self, rank: int, c: PMICommand, names: dict[str, str]) -> list[Reply]:
        service, port = c.require("service"), c.require("port")
        if service in names:
            return [Reply(rank, format_command("publish_result", rc=-1, msg="name_in_use"))]
        names[service] = port
        return self._one(rank, "publish_result")

    def _cmd_unpublish_name(self, rank: int, c: PMICommand, names: dict[str, str]) -> list[Reply]:
        if names.pop(c.require("service"), None) is None:
            return [Reply(rank, format_command("unpublish_result", rc=-1, msg="name_not_found"))]
        return self._one(rank, "unpublish_result")

    def _cmd_spawn(self, rank: int, c: PMICommand, names: dict[str, str]) -> list[Reply]:
        """``MPI_Comm_spawn[_multiple]``: MPICH sends one ``mcmd=spawn`` block per command and
        reads one reply after the last. The finished request is queued in :attr:`spawns` for
        the transport, which answers once the children are started (or could not be)."""
        request = self._collectors.setdefault(rank, SpawnCollector()).add(c)
        if request is not None:
            self.spawns.append((rank, request))
        return []

    def _cmd_lookup_name(self, rank: int, c: PMICommand, names: dict[str, str]) -> list[Reply]:
        port = names.get(c.require("service"))
        if port is None:
            return [Reply(rank, format_command("lookup_result", rc=-1, msg="name_not_found"))]
        return self._one(rank, "lookup_result", port=port)
