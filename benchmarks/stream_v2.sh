#!/usr/bin/env bash
# Regenerates docs/benchmarks/stream_v2.{json,png}: DECTRIS Stream V2 ingest of 4000 images of
# 512² uint16, bslz4, into 2 decoding ranks, against a plain PULL socket decoding the same.
set -euo pipefail
cd "$(dirname "$0")/.."
spark-mpi bench stream-v2 --frames 4000 --size 512 --ranks 2 --batch-interval 0.5 \
    --json docs/benchmarks/stream_v2.json --plot docs/benchmarks/stream_v2.png
