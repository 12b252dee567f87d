#!/usr/bin/env bash
# Regenerates docs/benchmarks/faults.{json,png}: seconds from each fault under a running job to
# the driver's MPIJobError on a 3-node namespace cluster, and the driver under connection
# floods (root).
set -euo pipefail
cd "$(dirname "$0")/.."
spark-mpi bench faults --repeat 3 --json docs/benchmarks/faults.json --plot docs/benchmarks/faults.png
