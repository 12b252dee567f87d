"""SLURM: an sbatch script in the style of the seed's Fig. 2/4, and submitting it.

The script starts a Spark standalone master on the job's first node, one worker per node with
``srun``, submits the application to the master with ``spark-submit`` (the driver, and with it
the PMI server, runs on the first node, bound to that node's address so every node reaches it),
and tears everything down when the application ends, however it ends.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

from sparkmpi.deploy.standalone import SPARK_HOME

TEMPLATE = """#!/bin/bash
#SBATCH --job-name={job_name}
#SBATCH --nodes={nodes}
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task={cores}
#SBATCH --time={time}
#SBATCH --output={output}
{partition}
# Written by `spark-mpi slurm script`: Spark standalone master on the first node, one worker
# per node (srun), the application submitted to the master; everything stops at the end.
set -euo pipefail
PYTHON={python}
export SPARK_HOME={spark_home}
export PYSPARK_PYTHON="$PYTHON" PYSPARK_DRIVER_PYTHON="$PYTHON"
STATE=$(mktemp -d "${{TMPDIR:-/tmp}}/spark-mpi-$SLURM_JOB_ID.XXXXXX")
MASTER_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_ADDR={master_addr}
# the driver runs here, on the first node: its PMI server must be reachable from every node
export SPARKMPI_PMI_HOST="$MASTER_ADDR" SPARK_LOCAL_IP="$MASTER_ADDR"
echo "spark-mpi: master on $MASTER_NODE ($MASTER_ADDR), $SLURM_JOB_NUM_NODES node(s)"

"$PYTHON" -m sparkmpi.cli cluster start --workers 0 --host "$MASTER_ADDR" \\
    --state-dir "$STATE/master"
URL=$(cat "$STATE/master/url")
srun --ntasks-per-node=1 --cpus-per-task={cores} --kill-on-bad-exit=0 \\
    --output="${{SLURM_SUBMIT_DIR:-.}}/spark-mpi-$SLURM_JOB_ID-worker-%t.log" \\
    "$PYTHON" -m sparkmpi.cli cluster worker --master "$URL" --cores {cores} --memory {memory} \\
    --work-dir "$STATE/work" &
WORKERS=$!
cleanup() {{
    kill "$WORKERS" 2>/dev/null || true
    wait "$WORKERS" 2>/dev/null || true
    "$PYTHON" -m sparkmpi.cli cluster stop --state-dir "$STATE/master" || true
    rm -rf "$STATE"
}}
trap cleanup EXIT
"$PYTHON" -m sparkmpi.cli cluster status --state-dir "$STATE/master" \\
    --wait-workers "$SLURM_JOB_NUM_NODES"

"$SPARK_HOME/bin/spark-submit" --master "$URL" --conf spark.driver.host="$MASTER_ADDR" \\
    --conf spark.executor.cores={cores} {app} {args}
"""


def sbatch_script(
    app: str,
    args: list[str] | None = None,
    *,
    nodes: int = 1,
    cores_per_node: int = 2,
    time_limit: str = "00:30:00",
    partition: str | None = None,
    memory: str = "2g",
    output: str = "spark-mpi-%j.out",
    job_name: str = "spark-mpi",
    master_address: str | None = None,
) -> str:
    """The text of an sbatch script that runs ``app`` (a PySpark/``run_mpi`` program) on a
    Spark standalone cluster spanning the job's nodes. ``master_address`` overrides the first
    node's address (default: what the node name resolves to)."""
    if nodes < 1 or cores_per_node < 1:
        raise ValueError("nodes and cores per node must be at least 1")
    if not re.fullmatch(r"(\d+-)?\d+(:\d+){0,2}", time_limit):
        raise ValueError(f"time must look like MINUTES, HH:MM:SS or D-HH:MM:SS, not {time_limit!r}")
    resolved = "$(getent hosts \"$MASTER_NODE\" | awk '{print $1; exit}')"
    return TEMPLATE.format(
        job_name=job_name,
        nodes=nodes,
        cores=cores_per_node,
        time=time_limit,
        output=output,
        partition=f"#SBATCH --partition={partition}" if partition else "",
        python=shlex.quote(sys.executable),
        spark_home=shlex.quote(str(SPARK_HOME)),
        master_addr=shlex.quote(master_address) if master_address else resolved,
        memory=memory,
        app=shlex.quote(str(Path(app).resolve())),
        args=" ".join(shlex.quote(a) for a in args or []),
    )


def _job_state(job_id: str) -> tuple[str, str]:
    """(state, exit code) of a job from ``scontrol``; ('', '') once SLURM forgot it."""
    done = subprocess.run(
        ["scontrol", "show", "job", job_id], capture_output=True, text=True, check=False
    )
    state = re.search(r"JobState=(\S+)", done.stdout)
    code = re.search(r"ExitCode=(\S+)", done.stdout)
    return (state[1] if state else "", code[1] if code else "")


def submit(script: str | Path, follow: bool = True, poll: float = 1.0, log=print) -> int:
    """Submits ``script`` with sbatch; when ``follow``, prints the job's output as it grows and
    returns 0 if the job completed, 1 otherwise."""
    done = subprocess.run(
        ["sbatch", "--parsable", str(script)], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"sbatch {script}: {done.stderr.strip() or done.stdout.strip()}")
    job_id = done.stdout.strip().split(";")[0]
    log(f"submitted job {job_id}")
    if not follow:
        return 0
    output = _output_path(Path(script), job_id)
    shown = 0
    state = ""
    while True:
        state, code = _job_state(job_id)
        if output is not None and output.exists():
            text = output.read_text(errors="replace")
            if len(text) > shown:
                sys.stdout.write(text[shown:])
                sys.stdout.flush()
                shown = len(text)
        if state not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED"):
            break
        time.sleep(poll)
    log(f"job {job_id}: {state or 'gone'} (exit code {code or '?'})")
    return 0 if state == "COMPLETED" else 1


def _output_path(script: Path, job_id: str) -> Path | None:
    match = re.search(r"^#SBATCH --output=(\S+)", script.read_text(), re.M)
    name = match[1] if match else "slurm-%j.out"
    path = Path(name.replace("%j", job_id))
    return path if path.is_absolute() else script.parent / path
