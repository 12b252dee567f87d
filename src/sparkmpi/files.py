"""File plumbing shared by every layer: one-line input errors and all-or-nothing, durable
writes."""

from __future__ import annotations

import contextlib
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


def fsync_path(path: str | os.PathLike) -> None:
    """Flushes ``path`` (a file or a directory) to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path beside ``path`` (parents created) to write to.

    On a clean exit the temporary file is flushed to disk and replaces ``path`` in one
    rename, and the directory is flushed too, so once this returns ``path`` holds the new
    content even after a power loss. On an exception the temporary file is removed and
    ``path`` is untouched, so a failed write leaves no partial or stray file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # keep the real suffix last: some writers pick or append one from the name
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def check_output_path(path: str | os.PathLike) -> Path:
    """``path`` as a file this process may create or replace; :class:`InputFileError` (one
    line naming it) if it is a directory, a parent is not a directory, or the nearest existing
    parent is not writable. Meant to run before any work, so a bad output costs nothing."""
    path = Path(path)
    if path.is_dir():
        raise InputFileError(f"{path}: is a directory, not a file to write")
    existing = path.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise InputFileError(f"{path}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputFileError(f"{path}: cannot write in {existing}")
    return path


@contextmanager
def atomic_outputs(*paths: str | os.PathLike) -> Iterator[list[Path]]:
    """:func:`atomic_output` for several files that belong together (a volume and its PNG):
    on a clean exit each replaces its path; on an exception none is written."""
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(atomic_output(path)) for path in paths]
