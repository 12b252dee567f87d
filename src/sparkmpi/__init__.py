"""spark-mpi: MPI applications across the workers of a Spark cluster.

``from sparkmpi import run_mpi, MPISession`` — imported lazily so that rank processes, which
import :mod:`sparkmpi.runner.rank`, do not pay for Spark.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["InsufficientSlotsError", "MPIJobError", "MPISession", "run_mpi", "run_script"]

if TYPE_CHECKING:  # what IDEs and type checkers see; at run time they load on first use
    from sparkmpi.runner.api import run_mpi, run_script
    from sparkmpi.runner.errors import InsufficientSlotsError, MPIJobError
    from sparkmpi.runner.session import MPISession


def __getattr__(name: str):
    if name in __all__:
        import sparkmpi.runner as runner

        return getattr(runner, name)
    raise AttributeError(f"module 'sparkmpi' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
