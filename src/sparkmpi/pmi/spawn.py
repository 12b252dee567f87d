"""``MPI_Comm_spawn`` over PMI-1: what MPICH's ``mcmd=spawn`` blocks ask for, as plain data.

MPICH sends one block per command of ``MPI_Comm_spawn_multiple`` (``spawnssofar`` of
``totspawns``), each with its executable, ``nprocs``, ``argcnt`` and ``arg1..argN``, its info
keys (``info_key_i``/``info_val_i``), and in the first block the ``preput`` pairs that go into
the new job's KVS before any child starts (``PARENT_ROOT_PORT_NAME``). Pure functions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sparkmpi.pmi.protocol import KEYLEN_MAX, VALLEN_MAX, PMICommand, PMIProtocolError

SPAWN_COMMANDS_MAX = 64
SPAWN_PROCS_MAX = 256
"""Most processes one ``MPI_Comm_spawn[_multiple]`` may start."""
_LIST_MAX = 512


@dataclass(frozen=True)
class SpawnCommand:
    """One command: ``nprocs`` copies of ``execname`` with ``argv``; ``info`` as given."""

    execname: str
    nprocs: int
    argv: tuple[str, ...] = ()
    info: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class SpawnRequest:
    """A whole ``MPI_Comm_spawn[_multiple]``: its commands and the new job's preput KVS."""

    commands: tuple[SpawnCommand, ...]
    preput: dict[str, str] = field(default_factory=dict)

    @property
    def size(self) -> int:
        """Processes in the new job (all commands)."""
        return sum(c.nprocs for c in self.commands)

    def appnums(self) -> list[int]:
        """``MPI_APPNUM`` of each new rank: the index of the command that started it."""
        return [i for i, c in enumerate(self.commands) for _ in range(c.nprocs)]


def _count(block: PMICommand, key: str, high: int) -> int:
    value = block.require_int(key)
    if not 0 <= value <= high:
        raise PMIProtocolError(f"spawn: {key}={value} is outside 0..{high}")
    return value


def _pairs(block: PMICommand, count_key: str, key_fmt: str, val_fmt: str) -> list[tuple[str, str]]:
    count = _count(block, count_key, _LIST_MAX) if block.get(count_key) is not None else 0
    return [(block.require(key_fmt % i), block.require(val_fmt % i)) for i in range(count)]


def parse_spawn_block(block: PMICommand) -> tuple[int, int, SpawnCommand, dict[str, str]]:
    """``(spawnssofar, totspawns, command, preput)`` of one ``mcmd=spawn`` block;
    :class:`PMIProtocolError` naming the first missing or out-of-range field."""
    total = _count(block, "totspawns", SPAWN_COMMANDS_MAX)
    so_far = block.require_int("spawnssofar")
    if not 1 <= so_far <= total:
        raise PMIProtocolError(f"spawn block {so_far} of {total} is out of range")
    nprocs = _count(block, "nprocs", SPAWN_PROCS_MAX)
    if nprocs < 1:
        raise PMIProtocolError("spawn: nprocs must be at least 1")
    argcnt = _count(block, "argcnt", _LIST_MAX) if block.get("argcnt") is not None else 0
    argv = tuple(block.require(f"arg{i + 1}") for i in range(argcnt))
    info = _pairs(block, "info_num", "info_key_%d", "info_val_%d")
    preput = dict(_pairs(block, "preput_num", "preput_key_%d", "preput_val_%d"))
    for key, value in preput.items():
        if len(key) > KEYLEN_MAX or len(value) > VALLEN_MAX:
            raise PMIProtocolError("spawn: preput key or value too long")
    execname = block.require("execname")
    return so_far, total, SpawnCommand(execname, nprocs, argv, tuple(info)), preput


@dataclass
class SpawnCollector:
    """Gathers one rank's blocks until the last; then :meth:`add` returns the request.

    MPICH reads one reply after its last block, so a bad block is remembered and reported
    (as :class:`PMIProtocolError`) only when the last block has arrived."""

    commands: list[SpawnCommand] = field(default_factory=list)
    preput: dict[str, str] = field(default_factory=dict)
    error: PMIProtocolError | None = None

    def add(self, block: PMICommand) -> SpawnRequest | None:
        """The finished request after the last block, else None; :class:`PMIProtocolError`
        after the last block if any block was bad or the request is too large."""
        try:
            so_far, total = block.require_int("spawnssofar"), block.require_int("totspawns")
        except PMIProtocolError:
            so_far = total = 0
        try:
            if self.error is not None:
                raise self.error
            so_far, total, command, preput = parse_spawn_block(block)
            if so_far != len(self.commands) + 1:
                raise PMIProtocolError(f"spawn block {so_far} arrived after {len(self.commands)}")
            self.commands.append(command)
            if so_far == 1:
                self.preput = preput
            if so_far < total:
                return None
            request = SpawnRequest(tuple(self.commands), self.preput)
            if request.size > SPAWN_PROCS_MAX:
                raise PMIProtocolError(f"spawn: more than {SPAWN_PROCS_MAX} processes")
        except PMIProtocolError as exc:
            if 1 <= so_far < total <= SPAWN_COMMANDS_MAX:
                self.error = exc
                return None
            self.commands, self.preput, self.error = [], {}, None
            raise
        self.commands, self.preput = [], {}
        return request
