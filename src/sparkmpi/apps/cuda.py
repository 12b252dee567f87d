"""The GPU the apps' ``cupy`` backends run on: is there one, and which one is this rank's.

Ranks get their GPU in one of two ways:

* Spark's resource scheduling (``spark.task.resource.gpu.amount=1`` on a standalone cluster):
  the runner sets ``CUDA_VISIBLE_DEVICES`` of each rank to its task's GPU addresses, so the
  rank sees exactly one device, device 0.
* No GPU resources: the ranks on one host take the host's visible devices round robin by
  their node-local rank; ranks that end up on the same GPU warn that they share it.

Kernels of the backends are CUDA C (``cupy.RawModule``) written against ``float``, ``float2``
and ``double`` only, so that they compile with NVRTC as cupy does and with ``nvcc`` alone
(which the tests use to check them on machines without a GPU).
"""

from __future__ import annotations

import os
import warnings

BACKEND_NAME = "cupy"


class GPUUnavailable(RuntimeError):
    """``--backend cupy`` on a machine (or rank) where cupy cannot reach a GPU."""


def unavailable_reason() -> str | None:
    """Why cupy cannot run here, in a few words, or None when it can."""
    try:
        import cupy
    except ImportError as exc:
        return f"cupy is not installed ({exc}; pip install cupy-cuda12x or cupy-cuda13x)"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CUDARuntimeError when there is no driver or device
        return f"CUDA reports no usable device ({exc})"
    if count < 1:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        return "no CUDA device is visible" + (
            f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else ""
        )
    return None


def require_cupy():
    """The cupy module, or :class:`GPUUnavailable` with one line saying why it cannot run."""
    reason = unavailable_reason()
    if reason is not None:
        raise GPUUnavailable(f"backend 'cupy' needs an NVIDIA GPU: {reason}")
    import cupy

    return cupy


def check_before_launch(backend: str, master: str | None) -> None:
    """For a command about to start ranks on this host (``master`` None or ``local...``):
    :class:`GPUUnavailable` now, before any work, when ``backend`` is cupy and this host has
    no GPU. Ranks on other hosts check for themselves when they start."""
    if backend == BACKEND_NAME and (master is None or master.startswith("local")):
        require_cupy()


def use_rank_device(comm=None) -> int:
    """Makes this rank's GPU cupy's current device and returns its index.

    With ``comm`` (an mpi4py communicator; collective) the ranks sharing this host take their
    visible devices round robin by node-local rank, and a rank whose GPU (by PCI bus id)
    another rank of the host also uses warns once. Without it, device 0.
    """
    cupy = require_cupy()
    count = cupy.cuda.runtime.getDeviceCount()
    if comm is None or comm.size == 1:
        cupy.cuda.Device(0).use()
        return 0
    from mpi4py import MPI

    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        device = local.rank % count
        bus = cupy.cuda.Device(device).pci_bus_id
        sharing = local.allgather(bus).count(bus)
    finally:
        local.Free()
    if sharing > 1:
        warnings.warn(
            f"{sharing} ranks on this host share GPU {bus}; set spark.task.resource.gpu.amount=1 "
            "on a cluster whose workers advertise their GPUs for one GPU per rank",
            stacklevel=2,
        )
    cupy.cuda.Device(device).use()
    return device


def to_host(array):
    """A numpy array of ``array`` (numpy or cupy), copied from the device if need be."""
    if hasattr(array, "get") and type(array).__module__.startswith("cupy"):
        return array.get()
    return array
