#!/usr/bin/env bash
# Regenerates docs/benchmarks/ptycho.{json,png}: 512 frames of 128², 100 RAAR iterations.
set -euo pipefail
cd "$(dirname "$0")/.."
spark-mpi bench ptycho --frames 512 --size 128 --iterations 100 --ranks 1,2 \
    --json docs/benchmarks/ptycho.json --plot docs/benchmarks/ptycho.png
