"""``spark-mpi bench conformance``: mpi4py's own test suite under spark-mpi and under mpiexec.

For each MPI library, the suite (from the sdist of the installed mpi4py, unpacked at set-up)
runs twice with the same number of ranks: ``spark-mpi run --np N --runtime R`` and the
library's own ``mpiexec -n N``. Every test's outcome on every rank is compared; a module
conforms when all its outcomes are identical. ``test_cco_buf`` is left out by default: it
hangs on a 2-core machine even under ``mpiexec``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from sparkmpi.bench.report import print_table, table_plot, write_json
from sparkmpi.durations import duration
from sparkmpi.runner.runtime import RUNTIMES, RuntimeNotFound, get_runtime

RANK_SCRIPT = Path(__file__).with_name("conformance_rank.py")
DEFAULT_EXCLUDE = "^test_cco_buf$"
LAUNCHERS = ("spark-mpi", "mpiexec")


def default_testdir() -> Path:
    """Where scripts/setup.sh unpacks the test suite of the installed mpi4py."""
    from importlib import metadata

    cache = Path(os.environ.get("SPARKMPI_CACHE", Path.home() / ".cache" / "sparkmpi"))
    return cache / f"mpi4py-{metadata.version('mpi4py')}" / "test"


def _command(launcher: str, runtime: str, ranks: int, args: list[str]) -> list[str]:
    if launcher == "spark-mpi":
        cli = [sys.executable, "-m", "sparkmpi.cli", "run", "--ranks", str(ranks)]
        return [*cli, "--runtime", runtime, str(RANK_SCRIPT), *args]
    mpiexec = str(get_runtime(runtime).mpiexec)
    return [mpiexec, "-n", str(ranks), sys.executable, str(RANK_SCRIPT), *args]


def _env(launcher: str, runtime: str) -> dict[str, str]:
    env = dict(os.environ)
    if launcher == "mpiexec":
        env.update(get_runtime(runtime).rank_env())
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    return env


def run_suite(
    launcher: str,
    runtime: str,
    ranks: int,
    testdir: Path,
    exclude: str,
    modules: list[str],
    timeout: float,
) -> dict:
    """One run of the suite: per-rank outcomes, seconds, and the run's exit status."""
    with tempfile.TemporaryDirectory(prefix="sparkmpi-conformance-") as out:
        args = [str(testdir), out, exclude, *modules]
        start = time.monotonic()
        try:
            done = subprocess.run(
                _command(launcher, runtime, ranks, args),
                env=_env(launcher, runtime),
                cwd=testdir,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
            status, tail = done.returncode, (done.stdout + done.stderr)[-2000:]
        except subprocess.TimeoutExpired:
            status, tail = None, f"did not finish within {timeout:g} s"
        seconds = time.monotonic() - start
        ranks_out = []
        for rank in range(ranks):
            path = Path(out) / f"rank-{rank}.json"
            ranks_out.append(json.loads(path.read_text()) if path.exists() else None)
    return {"status": status, "seconds": round(seconds, 1), "ranks": ranks_out, "tail": tail}


def _module(test_id: str) -> str:
    return test_id.split(".", 1)[0]


def per_module(run: dict) -> dict[str, dict]:
    """``{module: {"outcomes": {rank/test: outcome}, "counts": {...}}}`` of one run."""
    modules: dict[str, dict] = {}
    for rank, record in enumerate(run["ranks"]):
        for test, outcome in (record or {}).get("tests", {}).items():
            entry = modules.setdefault(_module(test), {"outcomes": {}, "counts": Counter()})
            entry["outcomes"][f"{rank}:{test}"] = outcome
            if rank == 0:
                entry["counts"][outcome] += 1
    return modules


def compare(runs: dict[str, dict]) -> dict[str, dict]:
    """Per module: counts under each launcher and whether every outcome is identical."""
    by_launcher = {launcher: per_module(run) for launcher, run in runs.items()}
    names = sorted(set().union(*by_launcher.values()))
    table = {}
    for name in names:
        entries = [by_launcher[launcher].get(name) for launcher in LAUNCHERS]
        outcomes = [e["outcomes"] if e else None for e in entries]
        table[name] = {
            "identical": outcomes[0] is not None and outcomes[0] == outcomes[1],
            **{
                launcher: dict(entry["counts"]) if entry else None
                for launcher, entry in zip(LAUNCHERS, entries, strict=True)
            },
        }
    return table


def _cell(counts: dict | None) -> str:
    if counts is None:
        return "did not run"
    parts = [f"{counts.get(k, 0)} {k}" for k in ("pass", "skip", "failure", "error")]
    return ", ".join(p for p in parts if not p.startswith("0 ")) or "no tests"


def _yes(flag: bool) -> str:
    return "yes" if flag else "NO"


def _total(result: dict, launcher: str) -> str:
    counts: Counter = Counter()
    for row in result["modules"].values():
        counts.update(row[launcher] or {})
    return _cell(dict(counts))


def _summary(runtime: str, result: dict) -> list[str]:
    same = sum(row["identical"] for row in result["modules"].values())
    name = f"{runtime} ({result['library']})"
    return [name, f"{same} of {len(result['modules'])}", *(_total(result, k) for k in LAUNCHERS)]


def markdown(results: dict[str, dict], title: str) -> str:
    """The per-module table of every MPI library, as Markdown."""
    lines = [f"### {title}", ""]
    for runtime, result in results.items():
        lines += [f"**{runtime}** ({result['library']}):", ""]
        lines += ["| module | spark-mpi run | mpiexec | identical |", "|---|---|---|---|"]
        for name, row in result["modules"].items():
            cells = [_cell(row["spark-mpi"]), _cell(row["mpiexec"]), _yes(row["identical"])]
            lines.append(f"| {name} | {' | '.join(cells)} |")
        lines.append("")
    return "\n".join(lines)


def _ok(run: dict) -> bool:
    return all(record is not None for record in run["ranks"])


def main(args: argparse.Namespace) -> int:
    testdir = Path(args.testdir) if args.testdir else default_testdir()
    if not (testdir / "main.py").exists():
        print(
            f"spark-mpi bench conformance: no mpi4py test suite at {testdir} "
            "(bash scripts/setup.sh unpacks it there)",
            file=sys.stderr,
        )
        return 2
    modules = [m for m in (args.modules or "").split(",") if m]
    results: dict[str, dict] = {}
    for runtime in args.runtimes.split(","):
        try:
            version = get_runtime(runtime).library_version().split(",")[0]
            library = " ".join(version.split())
        except (RuntimeNotFound, ValueError) as exc:
            print(f"skipped {runtime}: {exc}", file=sys.stderr)
            continue
        runs = {}
        for launcher in LAUNCHERS:
            print(f"{runtime} under {launcher}: running the suite ...", flush=True)
            runs[launcher] = run_suite(
                launcher, runtime, args.ranks, testdir, args.exclude, modules, args.timeout
            )
            print(f"  {runs[launcher]['seconds']:.0f} s, exit status {runs[launcher]['status']}")
            if not _ok(runs[launcher]):
                print(f"  a rank wrote no results; last output:\n{runs[launcher]['tail']}")
        table = compare(runs)
        results[runtime] = {
            "library": library,
            "runs": {k: {key: v[key] for key in ("status", "seconds")} for k, v in runs.items()},
            "modules": table,
            "identical": all(row["identical"] for row in table.values()) and bool(table),
        }
        rows = [
            [name, _cell(row["spark-mpi"]), _cell(row["mpiexec"]), _yes(row["identical"])]
            for name, row in table.items()
        ]
        print_table(f"{runtime}: {library}", ["module", *LAUNCHERS, "identical"], rows)
    summary = [_summary(runtime, result) for runtime, result in results.items()]
    columns = ["MPI", "modules identical", "tests under spark-mpi", "tests under mpiexec"]
    title = f"{testdir.parent.name} test suite, {args.ranks} ranks: spark-mpi run vs mpiexec"
    print_table(title, columns, summary)
    table_plot(args.plot, title, columns, summary)
    if args.markdown:
        Path(args.markdown).write_text(markdown(results, title))
    write_json(
        args.json,
        {"ranks": args.ranks, "exclude": args.exclude, "suite": testdir.parent.name, **results},
    )
    return 0 if results and all(r["identical"] for r in results.values()) else 1


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--runtimes", default=",".join(RUNTIMES), help="MPI libraries to check")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--modules", help="comma-separated test modules (default: all)")
    parser.add_argument("--exclude", default=DEFAULT_EXCLUDE, help="modules left out (regex)")
    parser.add_argument("--testdir", help="the suite's test/ directory (default: set-up's)")
    parser.add_argument("--timeout", type=duration, default=1800, help="per run (30m)")
    parser.add_argument("--json", help="write the results as JSON here")
    parser.add_argument("--plot", help="write the summary table as PNG here")
    parser.add_argument("--markdown", help="write the per-module tables as Markdown here")
    return parser
