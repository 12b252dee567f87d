#!/usr/bin/env bash
# Regenerates docs/benchmarks/allreduce-nodes.{json,png}: Table I across 1-3 nodes of a
# network-namespace cluster with 10 Gbit/s links, against mpiexec on the same nodes (root).
set -euo pipefail
cd "$(dirname "$0")/.."
spark-mpi bench allreduce --netns 3 --rate 10gbit --ranks 1,2,3 --size 2000000 --repeat 10 \
    --json docs/benchmarks/allreduce-nodes.json --plot docs/benchmarks/allreduce-nodes.png
