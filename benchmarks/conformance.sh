#!/usr/bin/env bash
# Regenerates docs/benchmarks/conformance.{json,png,md}: mpi4py's own test suite under
# spark-mpi run and under each MPI library's mpiexec, compared test by test.
set -euo pipefail
cd "$(dirname "$0")/.."
spark-mpi bench conformance --json docs/benchmarks/conformance.json \
    --plot docs/benchmarks/conformance.png --markdown docs/benchmarks/conformance.md
