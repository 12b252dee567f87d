#!/usr/bin/env bash
# A Spark cluster of N "hosts" on this machine, one Linux network namespace per node
# (root, iproute2): a thin wrapper over `spark-mpi cluster start|stop|status --netns`.
#   scripts/netns-cluster.sh up N [--cores 2,1,1] [--rate 10gbit] [--prefix smpi] [--state-dir DIR] ...
#   scripts/netns-cluster.sh status [--state-dir DIR]
#   scripts/netns-cluster.sh down [--prefix smpi] [--state-dir DIR]   # also when the state is gone
set -euo pipefail
PYTHON=${PYTHON:-python3}
usage() { sed -n '2,7p' "$0" >&2; exit 2; }
[ $# -ge 1 ] || usage
action=$1; shift
case "$action" in
    up)
        [ $# -ge 1 ] || usage
        nodes=$1; shift
        exec "$PYTHON" -m sparkmpi.cli cluster start --netns "$nodes" "$@" ;;
    status) exec "$PYTHON" -m sparkmpi.cli cluster status --netns "$@" ;;
    down) exec "$PYTHON" -m sparkmpi.cli cluster stop --netns "$@" ;;
    *) usage ;;
esac
