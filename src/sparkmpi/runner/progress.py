"""A rank-output sink that turns rank 0's ``iteration i/N ...`` lines into a progress bar."""

from __future__ import annotations

import re
import sys

from sparkmpi.runner.hub import print_prefixed

ITERATION = re.compile(r"^iteration (\d+)/(\d+)\s*(.*)$")


class IterationProgress:
    """Use as ``run_mpi(..., output=progress)`` inside ``with IterationProgress(...)``.

    Every rank line is still printed with its ``[rank N]`` prefix (the per-iteration log); on
    a terminal a rich progress bar also follows rank 0's ``iteration i/N <status>`` lines,
    showing the status text (e.g. the current error) beside it.
    """

    def __init__(self, description: str, total: int) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        console = Console(file=sys.stderr)
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[status]}"),
            console=console,
            transient=True,
            disable=not console.is_terminal,
        )
        self._task = self._progress.add_task(description, total=total, status="")

    def __enter__(self) -> IterationProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.stop()

    def __call__(self, rank: int, stream: str, text: str) -> None:
        print_prefixed(rank, stream, text)
        if rank != 0 or stream != "stdout":
            return
        for line in text.splitlines():
            match = ITERATION.match(line.strip())
            if match:
                done, total, status = int(match[1]), int(match[2]), match[3]
                self._progress.update(self._task, completed=done, total=total, status=status)
