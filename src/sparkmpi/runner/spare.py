"""Pre-started rank processes: the interpreter is up before the job that will use it exists.

Each Spark Python worker keeps one *spare*: ``python -m sparkmpi.runner.rank --spare`` with
its imports done but MPI untouched, waiting on a Unix socket. A task hands it the job's
environment and its two sockets (``PMI_FD`` and the data channel) with ``SCM_RIGHTS``, and the
spare carries on as an ordinary rank process. It still serves exactly one job (MPI is
initialised once per process); the task starts the next spare when its rank has ended. A spare
dies with its worker (``PR_SET_PDEATHSIG``), and a worker that never runs a job never has one.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

_LENGTH = struct.Struct("!Q")
SPARE_FD_VARIABLE = "SPARKMPI_SPARE_FD"
# Read when the interpreter starts, the MPI library loads or a spare's imports load their
# thread pools (BLAS, OpenMP, numba): a spare cannot honour a change.
_STARTUP_VARIABLES = (
    "PYTHON",
    "LD_",
    "MPI4PY",
    "OMP_",
    "OPENBLAS_",
    "MKL_",
    "BLIS_",
    "GOTO_",
    "VECLIB_",
    "NUMEXPR_",
    "NUMBA_",
)
START_DELAY_S = 0.2
"""A new spare starts this long after a rank ends, once its job has wound down."""


@dataclass
class Spare:
    """A waiting rank interpreter and the socket that will hand it its job."""

    proc: subprocess.Popen
    sock: socket.socket
    env: dict[str, str] = field(default_factory=dict)

    def close(self) -> None:
        self.sock.close()  # the spare sees EOF and exits
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()


_spare: Spare | None = None
_lock = threading.Lock()
_requests: queue.SimpleQueue[tuple[list[str], dict[str, str]]] = queue.SimpleQueue()
_keeper: threading.Thread | None = None


def request_spare(command: list[str], startup_env: dict[str, str]) -> None:
    """Asks for a spare running ``command --spare`` to be started soon in this worker, with
    ``startup_env`` (the MPI runtime's variables) added to the worker's environment.

    Spares are started by one long-lived thread: a child's ``PR_SET_PDEATHSIG`` fires when
    the *thread* that started it ends, and this one lasts as long as the worker.
    """
    global _keeper
    with _lock:
        if _keeper is None:
            _keeper = threading.Thread(target=_keep, name="sparkmpi-spares", daemon=True)
            _keeper.start()
    _requests.put((command, startup_env))


def _keep() -> None:
    global _spare
    while True:
        command, startup_env = _requests.get()
        time.sleep(START_DELAY_S)
        with _lock:
            if _spare is not None and _spare.proc.poll() is None:
                if not _needs_fresh_interpreter(_spare.env, {**os.environ, **startup_env}):
                    continue
                _spare.close()
            _spare = _spawn(command, startup_env)


def _spawn(command: list[str], startup_env: dict[str, str]) -> Spare | None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    env = {**os.environ, **startup_env, "PYTHONUNBUFFERED": "1"}
    spawn_env = {
        **env,
        SPARE_FD_VARIABLE: str(theirs.fileno()),
        "SPARKMPI_PARENT_PID": str(os.getpid()),
    }
    try:
        proc = subprocess.Popen(
            [*command, "--spare"],
            env=spawn_env,
            pass_fds=(theirs.fileno(),),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
    except OSError:
        ours.close()
        return None
    finally:
        theirs.close()
    return Spare(proc, ours, env)


def _needs_fresh_interpreter(started_with: dict[str, str], env: dict[str, str]) -> bool:
    return any(
        key.startswith(_STARTUP_VARIABLES) and env.get(key) != started_with.get(key)
        for key in set(env) | set(started_with)
    )


@contextlib.contextmanager
def spares_paused() -> Iterator[set[int]]:
    """While the block runs no spare is started in this worker; yields the PIDs of its spares."""
    with _lock:
        spare = _spare
        yield {spare.proc.pid} if spare is not None and spare.proc.poll() is None else set()


def take_spare(env: dict[str, str], fds: tuple[int, int]) -> subprocess.Popen | None:
    """This worker's spare, now running with ``env`` and ``fds`` (PMI, channel); None if
    there is no live spare or ``env`` changes what only a fresh interpreter can pick up."""
    global _spare
    with _lock:
        spare, _spare = _spare, None
    if spare is None:
        return None
    if spare.proc.poll() is not None or _needs_fresh_interpreter(spare.env, env):
        spare.close()
        return None
    payload = json.dumps(env).encode()
    try:
        socket.send_fds(spare.sock, [_LENGTH.pack(len(payload))], list(fds))
        spare.sock.sendall(payload)
    except OSError:
        spare.close()
        return None
    spare.sock.close()
    return spare.proc


def wait_for_job() -> None:
    """In a spare: blocks until a task hands over a job, then installs its environment and
    sockets in this process. Exits quietly if the worker closes the socket instead."""
    sock = socket.socket(fileno=int(os.environ.pop(SPARE_FD_VARIABLE)))
    header, fds, _, _ = socket.recv_fds(sock, _LENGTH.size, 2)
    if len(header) < _LENGTH.size or len(fds) != 2:
        os._exit(0)
    (length,) = _LENGTH.unpack(header)
    payload = bytearray()
    while len(payload) < length:
        chunk = sock.recv(length - len(payload))
        if not chunk:
            os._exit(0)
        payload += chunk
    sock.close()
    env = json.loads(payload)
    env.update(PMI_FD=str(fds[0]), SPARKMPI_CHANNEL_FD=str(fds[1]))
    os.environ.clear()
    os.environ.update(env)


def preload() -> None:
    """Loads, while the spare waits, what every rank loads anyway: the MPI library (not yet
    initialised: ``MPI_Init`` needs the job's ``PMI_FD``), cloudpickle and numpy."""
    for module in ("cloudpickle", "numpy"):
        with contextlib.suppress(ImportError):
            __import__(module)
    import mpi4py

    mpi4py.rc.initialize = False
    mpi4py.rc.finalize = False
    from mpi4py import MPI  # noqa: F401


def ensure_mpi_initialized() -> None:
    """Initialises MPI if this process preloaded it uninitialised (a spare)."""
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and not mpi.Is_initialized():
        mpi.Init_thread(mpi.THREAD_MULTIPLE)
