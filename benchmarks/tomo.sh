#!/usr/bin/env bash
# Regenerates docs/benchmarks/tomo.{json,png}: one ART iteration, 256x256x74 → 256³.
set -euo pipefail
cd "$(dirname "$0")/.."
spark-mpi bench tomo --size 256 --ranks 1,2 --textbook-slices 4 \
    --json docs/benchmarks/tomo.json --plot docs/benchmarks/tomo.png
