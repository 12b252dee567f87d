"""One rank of the conformance run: mpi4py's own test suite, each test's outcome to JSON.

Run as an MPI program (``spark-mpi run`` or ``mpiexec``)::

    conformance_rank.py TESTDIR OUTDIR [EXCLUDE_REGEX [MODULE ...]]

It drives the suite's ``main.py`` as ``main.py --no-numba -e EXCLUDE MODULE...`` would, and
writes ``OUTDIR/rank-N.json``: the MPI library and ``{test id: outcome}`` for this rank.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import sys
import unittest
from pathlib import Path


class RecordingResult(unittest.TextTestResult):
    """A text result that also keeps one outcome per test id (a failed subtest fails it)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.outcomes: dict[str, str] = {}

    def _set(self, test, outcome: str) -> None:
        if self.outcomes.get(test.id()) not in ("failure", "error"):
            self.outcomes[test.id()] = outcome

    def addSuccess(self, test):
        super().addSuccess(test)
        self._set(test, "pass")

    def addFailure(self, test, err):
        super().addFailure(test, err)
        self._set(test, "failure")

    def addError(self, test, err):
        super().addError(test, err)
        self._set(test, "error")

    def addSkip(self, test, reason):
        super().addSkip(test, reason)
        self._set(test, "skip")

    def addExpectedFailure(self, test, err):
        super().addExpectedFailure(test, err)
        self._set(test, "pass")

    def addUnexpectedSuccess(self, test):
        super().addUnexpectedSuccess(test)
        self._set(test, "failure")

    def addSubTest(self, test, subtest, err):
        super().addSubTest(test, subtest, err)
        if err is not None:
            self._set(test, "failure" if issubclass(err[0], test.failureException) else "error")


def main(argv: list[str]) -> None:
    testdir, outdir = Path(argv[0]), Path(argv[1])
    exclude = argv[2] if len(argv) > 2 else ""
    modules = argv[3:]
    sys.path.insert(0, str(testdir))
    sys.argv = [str(testdir / "main.py")]
    suite_main = importlib.import_module("main")
    results: list[RecordingResult] = []

    class Runner(unittest.TextTestRunner):
        resultclass = RecordingResult

        def run(self, test):
            result = super().run(test)
            results.append(result)  # type: ignore[arg-type]
            return result

    options = ["main.py", "--no-numba", "-q", *(["-e", exclude] if exclude else []), *modules]
    with contextlib.suppress(SystemExit):
        suite_main.TestProgram(module=None, argv=options, testRunner=Runner)
    from mpi4py import MPI

    rank = MPI.COMM_WORLD.Get_rank()
    library = MPI.Get_library_version().strip().splitlines()[0]
    outdir.mkdir(parents=True, exist_ok=True)
    record = {"library": library, "size": MPI.COMM_WORLD.Get_size(), "tests": {}}
    if results:
        record["tests"] = results[-1].outcomes
    (outdir / f"rank-{rank}.json").write_text(json.dumps(record, indent=1, sort_keys=True))


if __name__ == "__main__":
    main(sys.argv[1:])
