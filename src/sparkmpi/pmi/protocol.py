"""The PMI-1 wire protocol as MPICH's and Intel MPI's clients speak it: pure functions.

A message is one line, ``cmd=NAME key=value key=value ...\\n``. Values end at a space; a
backslash escapes the next character (so ``\\ `` is a space inside a value). Keys may stand
alone without ``=value``. Nothing here touches a socket.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

MAX_LINE = 4096
"""Longest line accepted, newline included (MPICH's ``PMIU_MAXLINE`` is 1024 + margin)."""

KVSNAME_MAX = 256
KEYLEN_MAX = 64
VALLEN_MAX = 1024

_KEY = re.compile(r"[A-Za-z0-9_\-/]+")


class PMIProtocolError(ValueError):
    """A line that is not a well-formed PMI-1 command."""


@dataclass(frozen=True)
class PMICommand:
    """One parsed PMI-1 line: its command name and its attributes, unescaped."""

    cmd: str
    args: dict[str, str | None] = field(default_factory=dict)
    raw: str = ""

    def get(self, key: str, default: str | None = None) -> str | None:
        return self.args.get(key, default)

    def require(self, key: str) -> str:
        """The value of ``key``; :class:`PMIProtocolError` naming it when it is missing."""
        value = self.args.get(key)
        if value is None:
            raise PMIProtocolError(f"cmd={self.cmd} needs {key}=")
        return value

    def require_int(self, key: str) -> int:
        value = self.require(key)
        try:
            return int(value)
        except ValueError:
            raise PMIProtocolError(f"cmd={self.cmd}: {key}={value!r} is not an integer") from None


def escape_value(value: str) -> str:
    """``value`` with backslashes and spaces escaped so it survives as one token."""
    if "\n" in value:
        raise PMIProtocolError("a PMI value cannot contain a newline")
    return value.replace("\\", "\\\\").replace(" ", "\\ ")


def _unescape(value: str) -> str:
    if "\\" not in value:
        return value
    out, i = [], 0
    while i < len(value):
        if value[i] == "\\" and i + 1 < len(value):
            out.append(value[i + 1])
            i += 2
        else:
            out.append(value[i])
            i += 1
    return "".join(out)


def _tokens(body: str) -> list[tuple[str, str | None]]:
    """Splits ``body`` into (key, value) pairs the way MPICH's ``parse_v1`` does."""
    pairs: list[tuple[str, str | None]] = []
    i, n = 0, len(body)
    while True:
        while i < n and body[i] == " ":
            i += 1
        if i >= n:
            return pairs
        match = _KEY.match(body, i)
        if not match:
            raise PMIProtocolError(f"expected a key at column {i}, got {body[i]!r}")
        key, i = match.group(), match.end()
        if i < n and body[i] not in "= ":
            raise PMIProtocolError(f"invalid character {body[i]!r} after key {key!r}")
        if i < n and body[i] == "=":
            i += 1
            if i >= n or body[i] == " ":
                raise PMIProtocolError(f"expected a value after {key}=")
            start = i
            while i < n and body[i] != " ":
                i += 2 if body[i] == "\\" and i + 1 < n else 1
            pairs.append((key, _unescape(body[start:i])))
        else:
            pairs.append((key, None))


def parse_command(line: str | bytes) -> PMICommand:
    """Parses one PMI-1 line (with or without its newline).

    Raises :class:`PMIProtocolError` for anything MPICH's own parser would reject: a line not
    starting with ``cmd=``, a bad key, a missing value, non-UTF-8 bytes, an over-long line.
    """
    if isinstance(line, bytes):
        if len(line) > MAX_LINE:
            raise PMIProtocolError(f"line longer than {MAX_LINE} bytes")
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError:
            raise PMIProtocolError("line is not UTF-8 text") from None
    if len(line) > MAX_LINE:
        raise PMIProtocolError(f"line longer than {MAX_LINE} characters")
    text = line.rstrip("\n").rstrip("\r")
    if "\n" in text or "\0" in text:
        raise PMIProtocolError("embedded newline or NUL in a PMI line")
    if not text.startswith("cmd="):
        shown = text[:40] + ("..." if len(text) > 40 else "")
        raise PMIProtocolError(f"expected 'cmd=', got {shown!r}")
    pairs = _tokens(text)
    cmd = pairs[0][1]
    if not cmd:
        raise PMIProtocolError("empty command name")
    args: dict[str, str | None] = {}
    for key, value in pairs[1:]:
        args[key] = value
    return PMICommand(cmd=cmd, args=args, raw=text)


MCMD_MAX_LINES = 512
"""Most attribute lines in one ``mcmd=`` block (a spawn's argv, info and preput pairs)."""
MCMD_END = "endcmd"


_SPAWN_KEY = re.compile(
    r"(nprocs|execname|totspawns|spawnssofar|argcnt|arg\d+|preput_num|preput_(key|val)_\d+"
    r"|info_num|info_(key|val)_\d+)="
)


def parse_mcmd(lines: list[str]) -> PMICommand:
    """Parses one PMI-1 multi-line command: ``mcmd=NAME``, then ``key=value`` lines (the value
    is the rest of the line, spaces and ``=`` included), then ``endcmd``, as MPICH sends
    ``mcmd=spawn``. MPICH writes a spawn argument as it is, so a line of a ``spawn`` block
    that does not start with one of its keys continues the value before it (an argument with
    newlines, as ``python -c`` code has). Raises :class:`PMIProtocolError` for a block that
    is not one."""
    if not lines or not lines[0].startswith("mcmd="):
        raise PMIProtocolError("a multi-line command starts with 'mcmd='")
    if lines[-1] != MCMD_END:
        raise PMIProtocolError(f"a multi-line command ends with {MCMD_END!r}")
    if len(lines) > MCMD_MAX_LINES + 2:
        raise PMIProtocolError(f"more than {MCMD_MAX_LINES} lines in one mcmd block")
    cmd = lines[0][len("mcmd=") :]
    if not _KEY.fullmatch(cmd):
        raise PMIProtocolError(f"invalid command name {cmd!r}")
    args: dict[str, str | None] = {}
    last = None
    for line in lines[1:-1]:
        if "\0" in line:
            raise PMIProtocolError("NUL in a PMI value")
        if cmd == "spawn" and last is not None and not _SPAWN_KEY.match(line):
            args[last] = f"{args[last]}\n{line}"
            continue
        key, sep, value = line.partition("=")
        if not sep or not _KEY.fullmatch(key):
            raise PMIProtocolError(f"expected key=value in mcmd={cmd}, got {line[:40]!r}")
        args[key] = value
        last = key
    return PMICommand(cmd=cmd, args=args, raw="\n".join(lines))


def format_command(cmd: str, *args: tuple[str, object] | str, **kwargs: object) -> str:
    """One PMI-1 line, newline included: ``cmd=NAME k=v ...``, values escaped.

    Positional ``(key, value)`` pairs keep their order and allow keys that are not Python
    identifiers; keyword arguments follow them.
    """
    if not _KEY.fullmatch(cmd):
        raise PMIProtocolError(f"invalid command name {cmd!r}")
    parts = [f"cmd={cmd}"]
    items: list[tuple[str, object]] = []
    for item in args:
        items.append((item, None) if isinstance(item, str) else item)
    items.extend(kwargs.items())
    for key, value in items:
        if not _KEY.fullmatch(key):
            raise PMIProtocolError(f"invalid key {key!r}")
        parts.append(key if value is None else f"{key}={escape_value(str(value))}")
    return " ".join(parts) + "\n"


def abort_message(command: PMICommand) -> str:
    """The free-text message of an ``abort`` command, spaces kept even when unescaped."""
    marker = " message="
    at = command.raw.find(marker)
    if at < 0:
        return ""
    return _unescape(command.raw[at + len(marker) :])


def error_reply(cmd: str, message: str) -> str:
    """The reply that refuses ``cmd`` with a readable message (rc=-1)."""
    return format_command(_reply_name(cmd), rc=-1, msg=message)


_REPLIES = {
    "init": "response_to_init",
    "initack": "initack",
    "get_maxes": "maxes",
    "get_appnum": "appnum",
    "get_my_kvsname": "my_kvsname",
    "get_universe_size": "universe_size",
    "put": "put_result",
    "get": "get_result",
    "barrier_in": "barrier_out",
    "finalize": "finalize_ack",
    "publish_name": "publish_result",
    "unpublish_name": "unpublish_result",
    "lookup_name": "lookup_result",
    "auth": "auth_result",
    "spawn": "spawn_result",
}


def _reply_name(cmd: str) -> str:
    name = _REPLIES.get(cmd, f"{cmd}_result")
    return name if _KEY.fullmatch(name) else "error"
