#!/usr/bin/env bash
# Regenerates docs/benchmarks/tomo_scale.{json,png}: FBP end to end (Parquet in, volume store
# out) at 256³ and 512³ from 360 projections on 2 ranks, against ASTRA's CPU FBP.
set -euo pipefail
cd "$(dirname "$0")/.."
spark-mpi bench tomo --scale --sizes 256,512 --projections 360 --library-slices 8 \
    --json docs/benchmarks/tomo_scale.json --plot docs/benchmarks/tomo_scale.png
