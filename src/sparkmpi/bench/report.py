"""Shared output of the benchmarks: a rich table, JSON and a PNG bar chart."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from pathlib import Path

from rich.console import Console
from rich.table import Table


def print_table(title: str, columns: list[str], rows: list[list[object]]) -> None:
    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify="right" if column != columns[0] else "left")
    for row in rows:
        table.add_row(*(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row))
    Console().print(table)


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", *args],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=30,
        )
    except OSError:
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def provenance() -> dict:
    """Which code made a figure, when, and on what machine."""
    import psutil

    package = str(Path(__file__).resolve().parents[1])  # the code that made the figure
    status = _git("status", "--porcelain", "--", package)
    return {
        "commit": _git("rev-parse", "HEAD") or "unknown (not a git checkout)",
        "uncommitted_source_changes": bool(status) if status is not None else None,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "cpu_model": _cpu_model(),
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "kernel": platform.release(),
            "python": platform.python_version(),
        },
        "software": {name: _version(name) for name in ("pyspark", "mpi4py", "mpich", "numpy")},
    }


def _version(distribution: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def write_json(path: str | Path | None, data: dict) -> None:
    """Writes ``data`` with its provenance (commit, date, machine) as JSON at ``path``."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        record = {**data, "provenance": provenance()}
        Path(path).write_text(json.dumps(record, indent=2) + "\n")


def bar_plot(path: str | Path | None, title: str, labels: list[str], seconds: list[float]) -> None:
    """A log-scale bar chart of ``seconds`` per label, written as PNG."""
    if not path:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    bars = ax.bar(
        labels, seconds, color=["#4c72b0", "#dd8452", "#55a868", "#c44e52"][: len(labels)]
    )
    ax.set_yscale("log")
    ax.set_ylabel("seconds (median, log scale)")
    ax.set_title(title)
    for bar, value in zip(bars, seconds, strict=True):
        ax.annotate(
            f"{value * 1e3:.1f} ms",
            (bar.get_x() + bar.get_width() / 2, value),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
