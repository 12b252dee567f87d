#!/usr/bin/env bash
# Regenerates docs/benchmarks/stream_faults.{json,png}: faults injected into a streamed scan
# (driver SIGKILL, rank SIGKILL mid-batch, hung rank, frozen broker) over Kafka and ZeroMQ.
set -euo pipefail
cd "$(dirname "$0")/.."
spark-mpi bench stream --faults --frames 192 --size 64 --transports kafka,zmq \
    --batch-interval 1 --iterations 10 --final-iterations 50 \
    --json docs/benchmarks/stream_faults.json --plot docs/benchmarks/stream_faults.png
