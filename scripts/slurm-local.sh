#!/usr/bin/env bash
# A one-node SLURM cluster on this machine for tests and trials, without systemd:
#   scripts/slurm-local.sh start DIR   # munged (as the munge user), slurmctld, slurmd; prints SLURM_CONF
#   scripts/slurm-local.sh stop DIR    # stops them by the PIDs in DIR
# Needs root and the Debian packages munge slurmctld slurmd slurm-client (scripts/setup.sh).
# The node advertises CPUS (default 4) whatever the core count, so small test jobs always fit.
set -euo pipefail
action=${1:?start or stop}
dir=$(realpath -m "${2:?state directory}")
cpus=${CPUS:-4}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

stop() {
    for name in slurmd slurmctld munged; do
        if [ -f "$dir/$name.pid" ]; then
            pid=$(cat "$dir/$name.pid")
            kill "$pid" 2>/dev/null || true
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -9 "$pid" 2>/dev/null || true
            rm -f "$dir/$name.pid"
        fi
    done
    if [ -f "$dir/munge-dir" ]; then rm -rf "$(cat "$dir/munge-dir")" "$dir/munge-dir"; fi
}

if [ "$action" = stop ]; then stop; exit 0; fi
[ "$action" = start ] || { echo "usage: $0 start|stop DIR" >&2; exit 2; }
for tool in munged slurmctld slurmd sbatch; do
    command -v "$tool" >/dev/null || { echo "slurm-local: $tool missing; run scripts/setup.sh" >&2; exit 1; }
done
mkdir -p "$dir/state" "$dir/spool"
# munged runs as the munge user, which may not reach $dir (e.g. under a private temp dir)
munge=$(mktemp -d /tmp/sparkmpi-munge.XXXXXX)
echo "$munge" > "$dir/munge-dir"
chown munge:munge "$munge"
chmod 711 "$munge"
node=$(hostname -s)
cat > "$dir/slurm.conf" <<CONF
ClusterName=sparkmpi
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
AuthType=auth/munge
AuthInfo=socket=$munge/munge.socket
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
KillWait=5
SlurmdParameters=config_overrides
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=60 State=UP
CONF
runuser -u munge -- munged --socket="$munge/munge.socket" --pid-file="$munge/munged.pid" \
    --log-file="$munge/munged.log" --seed-file="$munge/munged.seed"
cp "$munge/munged.pid" "$dir/munged.pid"
export SLURM_CONF=$dir/slurm.conf
slurmctld -f "$SLURM_CONF"
slurmd -f "$SLURM_CONF" -N "$node"
for _ in $(seq 100); do
    if sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
        echo "SLURM_CONF=$SLURM_CONF"
        exit 0
    fi
    sleep 0.2
done
echo "slurm-local: node did not come up; see $dir/slurmctld.log and $dir/slurmd.log" >&2
stop
exit 1
