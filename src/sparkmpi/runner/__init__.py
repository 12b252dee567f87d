"""The Spark side: MPI jobs as barrier stages, one fresh rank process per task.

Public entry points: :func:`run_mpi`, :func:`run_script`, :class:`MPISession`. They are
imported lazily: rank processes import :mod:`sparkmpi.runner.rank` and must start fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # what IDEs and type checkers see; at run time they load on first use
    from sparkmpi.runner.api import run_mpi, run_script
    from sparkmpi.runner.errors import (
        InsufficientSlotsError,
        MPIJobError,
        UnschedulableResourcesError,
    )
    from sparkmpi.runner.session import MPISession

_EXPORTS = {
    "run_mpi": "sparkmpi.runner.api",
    "run_script": "sparkmpi.runner.api",
    "MPISession": "sparkmpi.runner.session",
    "MPIJobError": "sparkmpi.runner.errors",
    "InsufficientSlotsError": "sparkmpi.runner.errors",
    "UnschedulableResourcesError": "sparkmpi.runner.errors",
}
__all__ = [
    "InsufficientSlotsError",
    "MPIJobError",
    "MPISession",
    "UnschedulableResourcesError",
    "run_mpi",
    "run_script",
]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'sparkmpi.runner' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
