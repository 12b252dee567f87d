"""Shared output of the benchmarks: a table, JSON and a PNG bar chart.

Only the standard library is needed to write the JSON, so solver benchmarks run on machines
that have Python, numpy and CUDA alone (the GPU machines); rich, psutil and matplotlib are
used where installed.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from pathlib import Path


def print_table(title: str, columns: list[str], rows: list[list[object]]) -> None:
    """Prints the table (rich when installed, else plain text)."""
    cells = [[f"{v:.4g}" if isinstance(v, float) else str(v) for v in row] for row in rows]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
        print(title)
        for line in [columns, *cells]:
            print("  ".join(v.rjust(w) for v, w in zip(line, widths, strict=True)))
        return
    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify="right" if column != columns[0] else "left")
    for row in cells:
        table.add_row(*row)
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
    package = str(Path(__file__).resolve().parents[1])  # the code that made the figure
    status = _git("status", "--porcelain", "--", package)
    commit = _git("rev-parse", "HEAD")
    stated = os.environ.get("SPARKMPI_SOURCE_COMMIT")
    if stated:  # a copy of a checkout elsewhere (a lent GPU machine): the caller names it
        seen = f"{commit}{' with changes' if status else ''}" if commit else "no git checkout"
        commit, status = f"{stated} (stated by SPARKMPI_SOURCE_COMMIT; git here: {seen})", ""
    return {
        "commit": commit or "unknown (not a git checkout)",
        "uncommitted_source_changes": bool(status) if status is not None else None,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "cpu_model": _cpu_model(),
            "memory_gib": round(
                os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1
            ),
            "kernel": platform.release(),
            "python": platform.python_version(),
        },
        "software": {name: _version(name) for name in _SOFTWARE},
    }


_SOFTWARE = ("pyspark", "mpi4py", "mpich", "numpy", "cupy", "cupy-cuda12x", "cupy-cuda13x")


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


def pyplot_for(path: str | Path | None):
    """matplotlib's pyplot (headless) when a PNG is wanted at ``path`` and can be drawn."""
    if not path:
        return None
    try:
        import matplotlib
    except ImportError:
        print(f"not written: {path} (matplotlib is not installed)")
        return None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def bar_plot(path: str | Path | None, title: str, labels: list[str], seconds: list[float]) -> None:
    """A log-scale bar chart of ``seconds`` per label, written as PNG."""
    plt = pyplot_for(path)
    if plt is None:
        return
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


def table_plot(path: str | Path | None, title: str, columns: list[str], rows: list[list[str]]):
    """The table as a PNG (one row per line, the header shaded)."""
    plt = pyplot_for(path)
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 0.6 + 0.24 * (len(rows) + 1)), dpi=110)
    ax.axis("off")
    table = ax.table(cellText=rows or [["" for _ in columns]], colLabels=columns, loc="upper left")
    table.auto_set_font_size(False)
    table.set_fontsize(7)
    table.auto_set_column_width(list(range(len(columns))))
    for (row, _), cell in table.get_celld().items():
        if row == 0:
            cell.set_facecolor("#dde4f0")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
