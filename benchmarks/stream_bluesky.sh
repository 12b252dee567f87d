#!/usr/bin/env bash
# Regenerates docs/benchmarks/stream_bluesky.{json,png}: a simulated ptychography scan (256 frames
# of 128², in a CXI file) reconstructed on 2 ranks from a Bluesky run (RunEngine, ophyd.sim,
# bluesky_kafka.Publisher into Tansu) and from the CXI file replayed over ZeroMQ: same final
# phase error?
set -euo pipefail
cd "$(dirname "$0")/.."
spark-mpi bench stream-bluesky --frames 256 --size 128 --batch-interval 0.5 --iterations 5 \
    --final-iterations 60 \
    --json docs/benchmarks/stream_bluesky.json --plot docs/benchmarks/stream_bluesky.png
