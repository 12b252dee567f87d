"""The Spark side: MPI jobs as barrier stages, one fresh rank process per task.

Public entry points: :func:`run_mpi`, :func:`run_script`, :class:`MPISession`.
"""

from sparkmpi.runner.api import run_mpi, run_script
from sparkmpi.runner.errors import InsufficientSlotsError, MPIJobError
from sparkmpi.runner.session import MPISession

__all__ = ["InsufficientSlotsError", "MPIJobError", "MPISession", "run_mpi", "run_script"]
