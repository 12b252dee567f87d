#!/usr/bin/env bash
# Regenerates docs/benchmarks/stream_tomo.{json,png}: 361 projections of 256² at 100 Hz streamed
# (golden-angle order) through ZeroMQ into the streaming FBP on 2 ranks.
set -euo pipefail
cd "$(dirname "$0")/.."
spark-mpi bench stream-tomo --size 256 --projections 361 --rate 100 --batch-interval 1 \
    --json docs/benchmarks/stream_tomo.json --plot docs/benchmarks/stream_tomo.png
