"""Spark's GPU scheduling, carried over to the ranks.

A task to which Spark assigned GPUs (``spark.task.resource.gpu.amount``) starts its rank with
``CUDA_VISIBLE_DEVICES`` set to those addresses, so the rank sees exactly its GPUs, as CUDA
devices 0, 1, ... The task also tells the driver its addresses, and the driver prints one
warning when ranks on one host were given the same GPU. Spark's local mode cannot schedule
task resources at all (its tasks would wait forever), so a job that asks for them there is
refused before it is submitted.

Imported by Spark tasks: nothing here imports pyspark.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

GPU_VARIABLE = "CUDA_VISIBLE_DEVICES"
_TASK_RESOURCE = re.compile(r"spark\.task\.resource\.([^.]+)\.amount")


def task_gpus(ctx) -> list[str]:
    """The GPU addresses Spark assigned to the task of ``ctx`` (a TaskContext); [] if none."""
    gpus = ctx.resources().get("gpu")
    return [str(address) for address in gpus.addresses] if gpus is not None else []


def gpu_env(gpus: Sequence[str], env: Mapping[str, str]) -> dict[str, str]:
    """``env`` (the user's environment for the ranks) with ``CUDA_VISIBLE_DEVICES`` set to the
    comma-joined ``gpus``; unchanged when there are none or ``env`` already sets it."""
    if not gpus or GPU_VARIABLE in env:
        return dict(env)
    return {GPU_VARIABLE: ",".join(gpus), **env}


def shared_gpus(
    hosts: Mapping[int, str], gpus: Mapping[int, Sequence[str]]
) -> dict[str, dict[str, list[int]]]:
    """Host -> GPU address -> ranks, for every address that two or more ranks on one host
    hold (``hosts[r]`` and ``gpus[r]`` are rank ``r``'s host and addresses); {} if none is."""
    holders: dict[str, dict[str, list[int]]] = {}
    for rank in sorted(gpus):
        for address in gpus[rank]:
            holders.setdefault(hosts.get(rank, "?"), {}).setdefault(address, []).append(rank)
    return {
        host: {address: ranks for address, ranks in sorted(by.items()) if len(ranks) > 1}
        for host, by in sorted(holders.items())
        if any(len(ranks) > 1 for ranks in by.values())
    }


def sharing_warning(job_id: str, shared: Mapping[str, Mapping[str, Sequence[int]]]) -> str:
    """One line that names each host and the GPU addresses its ranks share (``shared`` as
    returned by :func:`shared_gpus`, not empty)."""
    places = "; ".join(
        f"{host}: GPU {address} (ranks {', '.join(map(str, ranks))})"
        for host, by in shared.items()
        for address, ranks in by.items()
    )
    return (
        f"sparkmpi: warning: MPI job {job_id}: ranks on one host were given the same GPU, so "
        f"they share it: {places} (spark.task.resource.gpu.amount below 1, or workers on one "
        f"host that discover the same GPUs)"
    )


def local_mode_resources(master: str, conf: Mapping[str, str]) -> str | None:
    """Why a job cannot run on ``master`` with this Spark ``conf`` (key -> value): a plain
    local master (``local``, ``local[N]``) with task resources such as
    ``spark.task.resource.gpu.amount`` set, whose tasks Spark never schedules; else None."""
    if not (master == "local" or master.startswith("local[")):
        return None
    asked = sorted(key for key, value in conf.items() if _TASK_RESOURCE.fullmatch(key) and value)
    if not asked:
        return None
    settings = ", ".join(f"{key}={conf[key]}" for key in asked)
    return (
        f"Spark local mode ({master}) cannot schedule GPU or other task resources ({settings}): "
        f"its tasks would wait forever. Run on a standalone cluster or local-cluster[N,cores,MB] "
        f"whose workers advertise GPUs (spark.worker.resource.gpu.amount and "
        f"spark.worker.resource.gpu.discoveryScript), or drop the setting and let the ranks "
        f"share this host's GPUs (choose one by local rank)"
    )
