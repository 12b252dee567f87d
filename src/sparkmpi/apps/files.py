"""File plumbing shared by the apps: one-line input errors and all-or-nothing writes."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class InputFileError(ValueError):
    """An input file that cannot be used; the message is one line naming the file."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


def reason(exc: BaseException) -> str:
    """An exception as one line of text (its type when it has no message)."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


@contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path beside ``path`` (parents created) to write to.

    On a clean exit the temporary file replaces ``path`` in one rename; on an exception it is
    removed and ``path`` is untouched, so a failed write leaves no partial or stray file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # keep the real suffix last: some writers pick or append one from the name
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
