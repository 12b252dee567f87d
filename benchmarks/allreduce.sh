#!/usr/bin/env bash
# Regenerates docs/benchmarks/allreduce.{json,png}: the seed paper's Table I.
set -euo pipefail
cd "$(dirname "$0")/.."
spark-mpi bench allreduce --ranks 1,2,4,8 --size 2000000 --repeat 10 \
    --json docs/benchmarks/allreduce.json --plot docs/benchmarks/allreduce.png
