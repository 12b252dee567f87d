"""A rank's whole process tree, found and killed whatever sessions or process groups it made.

A rank may start children of its own (a helper server, a ``subprocess`` in its own session,
a double-forked daemon). Killing the rank's process group misses those that left it, and the
task, reading the rank's stdout and stderr until end of file, would wait for the last of them.
So the task's process becomes a *child subreaper* (``PR_SET_CHILD_SUBREAPER``, Linux ≥ 3.4, no
privileges, no systemd, no cgroup delegation needed): whatever the rank orphans is re-parented
to the task instead of to init, and stays findable. :func:`kill_tree` kills the rank, all its
descendants, and every child of the task that appeared while the rank ran, and reaps them.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import time
from collections.abc import Iterable

import psutil

PR_SET_CHILD_SUBREAPER = 36
ROUNDS = 20
"""Sweeps at most: each one kills what the previous one's deaths re-parented here."""


def become_subreaper() -> bool:
    """Makes this process the reaper of its orphaned descendants; False if Linux refused."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def children_now() -> set[int]:
    """PIDs of this process's children at this moment."""
    with contextlib.suppress(psutil.Error):
        return {child.pid for child in psutil.Process().children()}
    return set()


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [*root.children(recursive=True), root]
    except psutil.Error:
        return []


def kill_tree(rank_pid: int, existed_before: Iterable[int], keep: Iterable[int] = ()) -> int:
    """SIGKILLs the process ``rank_pid`` with its process group and all its descendants, and
    every child of this process that is not in ``existed_before`` or ``keep`` (orphans of the
    rank, re-parented here) with theirs; reaps all of them but ``rank_pid`` (its owner waits for
    it). Returns how many processes other than the rank were killed."""
    me = os.getpid()
    spared = set(existed_before) | set(keep) | {rank_pid, me}
    killed: set[int] = set()
    for _ in range(ROUNDS):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(rank_pid, signal.SIGKILL)
        targets = {p.pid: p for p in _tree(rank_pid)}
        for pid in children_now() - spared:
            targets.update((p.pid, p) for p in _tree(pid))
        targets.pop(me, None)
        for proc in targets.values():
            with contextlib.suppress(psutil.Error):
                proc.kill()
        others = [p for pid, p in targets.items() if pid != rank_pid]
        killed.update(p.pid for p in others)
        if not others:
            break
        _reap(others)
    return len(killed)


def _reap(procs: list[psutil.Process], timeout: float = 5.0) -> None:
    """Waits (at most ``timeout`` seconds in all) until ``procs`` are gone or zombies of another
    parent, reaping those that are this process's children."""
    deadline = time.monotonic() + timeout
    mine = children_now()
    for proc in procs:
        while time.monotonic() < deadline:
            if proc.pid in mine:
                try:
                    if os.waitpid(proc.pid, os.WNOHANG)[0] != 0:
                        break
                except ChildProcessError:
                    break
            else:
                try:
                    if proc.status() == psutil.STATUS_ZOMBIE:
                        break
                except psutil.Error:
                    break
            time.sleep(0.005)
