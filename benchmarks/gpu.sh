#!/usr/bin/env bash
# Regenerates docs/benchmarks/gpu-{512x128,2048x256}.{json,png} on a machine with one NVIDIA
# GPU and cupy: the solvers alone (no Spark, MPI or Java needed), against the same device's
# FFT bound and the cpu backend on the same machine. From a checkout without an install:
#   PYTHONPATH=src bash benchmarks/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python -m sparkmpi.bench.gpu --frames 512 --size 128 --iterations 100 --tomo-size 256 --fbp-size 512 \
    --json docs/benchmarks/gpu-512x128.json --plot docs/benchmarks/gpu-512x128.png
python -m sparkmpi.bench.gpu --frames 2048 --size 256 --iterations 100 --tomo-size 0 --skip-cpu \
    --json docs/benchmarks/gpu-2048x256.json --plot docs/benchmarks/gpu-2048x256.png
