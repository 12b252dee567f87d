"""Open MPI 5 ranks in a sparkmpi PMI-1 job, through a PMIx server host of our own.

Each rank gets its own host process (:mod:`sparkmpi.pmix.host`): it joins the PMI-1 job on the
rank's admitted socket and serves the rank as its PMIx server. :func:`start_host` starts it and
returns the environment the rank must be started with.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

DEFAULT_PREFIX = Path(os.environ.get("SPARKMPI_OMPI_PREFIX", "/opt/sparkmpi-ompi"))

PMI_VARIABLES = ("PMI_FD", "PMI_RANK", "PMI_SIZE", "PMI_PORT", "PMI_ID", "PMI_KVSNAME")
"""Variables of MPICH's PMI-1 that an Open MPI rank must not see."""


class HostFailed(RuntimeError):
    """The PMIx host could not set up: its message is the host's own reason."""


HOST_EXIT_S = 5.0
"""How long :meth:`PMIxHost.close` lets a host end on its own before it is killed."""


@dataclass
class PMIxHost:
    """A started host process and the private directory (mode 0700) it serves its rank in."""

    proc: subprocess.Popen[bytes]
    tmpdir: Path

    def close(self) -> None:
        """Ends the host (stdin EOF; SIGKILL if it lingers), reaps it and removes its
        directory, whatever state the host is in (killed already included)."""
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout=HOST_EXIT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.tmpdir, ignore_errors=True)


def _src_dir() -> str:
    return str(Path(__file__).resolve().parents[2])


def start_host(
    pmi_fd: int,
    rank: int,
    size: int,
    prefix: Path = DEFAULT_PREFIX,
    env: Mapping[str, str] | None = None,
    timeout: float = 120,
) -> tuple[PMIxHost, dict[str, str]]:
    """Starts the PMIx host for ``rank`` of ``size`` on the admitted PMI-1 socket ``pmi_fd``.

    Returns the host (close it when the rank has ended) and the complete environment to start
    the rank with: ``env`` (default ``os.environ``) without the PMI-1 variables, plus libpmix's
    client variables (``PMIX_*``), ``OPAL_PREFIX``, ``LD_LIBRARY_PATH`` with ``prefix/lib``
    first and ``MPI4PY_LIBMPI`` set to ``prefix/lib/libmpi.so.40``. The host inherits
    ``pmi_fd`` (the caller may close its own copy afterwards); its stderr is the caller's.

    The host lives until the rank finalizes, the PMI server closes the socket, or its stdin
    reaches EOF: :meth:`PMIxHost.close` (or the caller's death) ends it, so it never outlives
    the task, and removes its directory even when the host was killed. Waits for the host to
    be ready, which needs every rank of the job to have joined the PMI server, for at most
    ``timeout`` seconds; raises :class:`HostFailed` (after killing the host) when it reports
    an error or is not ready in time.
    """
    base = dict(os.environ if env is None else env)
    host_env = {k: v for k, v in base.items() if k not in PMI_VARIABLES}
    host_env.update(PMI_FD=str(pmi_fd), PMI_RANK=str(rank), PMI_SIZE=str(size))
    path = host_env.get("PYTHONPATH", "")
    host_env["PYTHONPATH"] = _src_dir() + (os.pathsep + path if path else "")
    tmpdir = Path(tempfile.mkdtemp(prefix="sparkmpi-pmix-"))
    host = subprocess.Popen(
        [sys.executable, "-m", "sparkmpi.pmix.host", str(prefix), str(tmpdir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=host_env,
        pass_fds=(pmi_fd,),
        close_fds=True,
    )
    started = PMIxHost(host, tmpdir)
    try:
        announcement = _read_announcement(host, timeout)
    except BaseException:
        host.kill()
        started.close()
        raise
    if "error" in announcement:
        host.kill()
        started.close()
        raise HostFailed(f"PMIx host of rank {rank}: {announcement['error']}")
    rank_env = {k: v for k, v in base.items() if k not in PMI_VARIABLES}
    rank_env.update(announcement["env"])
    lib = str(prefix / "lib")
    old = rank_env.get("LD_LIBRARY_PATH", "")
    rank_env["LD_LIBRARY_PATH"] = lib + (os.pathsep + old if old else "")
    rank_env["MPI4PY_LIBMPI"] = str(prefix / "lib" / "libmpi.so.40")
    rank_env["OPAL_PREFIX"] = str(prefix)
    return started, rank_env


def _read_announcement(host: subprocess.Popen[bytes], timeout: float) -> dict:
    """The first JSON line the host writes; :class:`HostFailed` if none within ``timeout``."""
    assert host.stdout is not None
    deadline = time.monotonic() + timeout
    data = b""
    fd = host.stdout.fileno()
    while b"\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0:
            raise HostFailed(f"the PMIx host was not ready within {timeout:g} s")
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            code = host.wait(timeout=5)
            raise HostFailed(f"the PMIx host exited with {code} before it was ready")
        data += chunk
    host.stdout.close()
    return json.loads(data.partition(b"\n")[0])


__all__ = ["HostFailed", "PMIxHost", "start_host"]
