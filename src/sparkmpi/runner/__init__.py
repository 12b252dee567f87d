"""The Spark side: MPI jobs as barrier stages, one fresh rank process per task.

Public entry points: :func:`run_mpi`, :func:`run_script`, :class:`MPISession`. They are
imported lazily: rank processes import :mod:`sparkmpi.runner.rank` and must start fast.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "run_mpi": "sparkmpi.runner.api",
    "run_script": "sparkmpi.runner.api",
    "MPISession": "sparkmpi.runner.session",
    "MPIJobError": "sparkmpi.runner.errors",
    "InsufficientSlotsError": "sparkmpi.runner.errors",
    "UnschedulableResourcesError": "sparkmpi.runner.errors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'sparkmpi.runner' has no attribute {name!r}")
