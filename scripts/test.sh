#!/usr/bin/env bash
# Runs the test suite: quick tests first, then the slow ones (standalone cluster, Intel MPI,
# benchmarks) as a separate step that must pass too.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

"$PYTHON" -m ruff check src tests examples
"$PYTHON" -m pytest -m "not slow" "$@"
"$PYTHON" -m pytest -m slow "$@"
