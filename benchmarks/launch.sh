#!/usr/bin/env bash
# Regenerates docs/benchmarks/launch*.{json,png}: launch time through Spark vs mpiexec.
set -euo pipefail
cd "$(dirname "$0")/.."
spark-mpi bench launch --ranks 2 --repeat 20 --json docs/benchmarks/launch.json --plot docs/benchmarks/launch.png
SPARKMPI_PRESTART=0 spark-mpi bench launch --ranks 2 --repeat 20 --json docs/benchmarks/launch-cold.json
