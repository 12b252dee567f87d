#!/usr/bin/env bash
# Regenerates docs/benchmarks/stream.{json,png}: a 512-frame scan at 20 Hz through Kafka and ZeroMQ.
set -euo pipefail
cd "$(dirname "$0")/.."
spark-mpi bench stream --frames 512 --size 128 --rate 20 --transports kafka,zmq \
    --batch-interval 2 --json docs/benchmarks/stream.json --plot docs/benchmarks/stream.png
