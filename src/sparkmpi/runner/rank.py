"""Main of one MPI rank process (``python -m sparkmpi.runner.rank``), started by its Spark task.

It inherits two sockets: ``PMI_FD`` (already admitted to the job's PMI space; MPI uses it)
and ``SPARKMPI_CHANNEL_FD`` (frames with its task: what to run, rows in, results out). It
dies with its task: ``PR_SET_PDEATHSIG`` turns the task's death into our SIGKILL.
"""

from __future__ import annotations

import builtins
import contextlib
import ctypes
import os
import pickle
import signal
import socket
import sys
import traceback
import types

from sparkmpi.runner.frames import Kind, decode, recv, recv_parts, send

ITEMS_PER_FRAME = 256


PROCESS_NAME = b"sparkmpi-rank"
SPARE_NAME = b"sparkmpi-spare"


def _prctl(option: int, value: object) -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(option, value)


def _set_name(name: bytes) -> None:
    """Names this process (``ps -o comm``, ``psutil.Process().name()``)."""
    pr_set_name = 15
    _prctl(pr_set_name, ctypes.c_char_p(name))


def _die_with_parent() -> None:
    pr_set_pdeathsig = 1
    _prctl(pr_set_pdeathsig, signal.SIGKILL)
    expected = os.environ.get("SPARKMPI_PARENT_PID")
    if expected and os.getppid() != int(expected):
        os._exit(70)  # the task is already gone


def _rows(chan: socket.socket):
    while True:
        kind, batch = recv(chan)
        if kind is Kind.END:
            return
        yield from batch  # type: ignore[misc]


def _run_function(chan: socket.socket, fn, comm) -> None:
    out = fn(comm, _rows(chan))
    if out is None:
        return
    try:
        items = iter(out)
    except TypeError:
        raise TypeError(
            f"the MPI function must yield its results or return an iterable, "
            f"not {type(out).__name__}"
        ) from None
    batch: list = []
    for item in items:
        batch.append(item)
        if len(batch) >= ITEMS_PER_FRAME:
            send(chan, Kind.ITEMS, batch)
            batch = []
    if batch:
        send(chan, Kind.ITEMS, batch)


def _serve_session(chan: socket.socket, comm) -> None:
    send(chan, Kind.READY, comm.Get_rank())
    functions: dict[bytes, object] = {}
    while True:
        kind, parts = recv_parts(chan)
        if kind is Kind.END:
            return
        seq, fn_bytes, data = decode(parts)
        fn = functions.get(fn_bytes)
        if fn is None:
            fn = functions[fn_bytes] = pickle.loads(fn_bytes)
        send(chan, Kind.RESULT, (seq, fn(comm, data)))


def _run_script(path: str, source: str, argv: list[str]) -> None:
    sys.argv = [path, *argv]
    sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
    code = compile(source, path, "exec")
    # the script is __main__, as under mpiexec, so its functions pickle by reference between
    # ranks (mpi4py.futures, comm.send of a function)
    script = types.ModuleType("__main__")
    script.__dict__.update(__file__=path, __builtins__=builtins)
    launcher, sys.modules["__main__"] = sys.modules.get("__main__"), script
    try:
        exec(code, script.__dict__)
    except SystemExit as exc:
        if exc.code not in (None, 0):  # as Python's own exit: True is 1, a message is 1
            status = int(exc.code) if isinstance(exc.code, int) else 1
            said = f": {exc.code}" if not isinstance(exc.code, int) else ""
            raise RuntimeError(f"{path} exited with status {status}{said}") from None
    finally:
        if launcher is not None:
            sys.modules["__main__"] = launcher


REPORT_WAIT_S = 30.0
"""How long a failed rank waits to be killed after reporting (a fallback: a lost driver link
makes its task kill it at once)."""


def _report(chan: socket.socket, rank: int, exc: BaseException) -> None:
    frames = traceback.extract_tb(exc.__traceback__)
    # Our own frames say nothing to the user; keep theirs.
    skip = sum(1 for f in frames if f.filename == __file__)
    tb = traceback.format_exception(type(exc), exc, exc.__traceback__)
    text = "".join(tb[:1] + tb[1 + skip :]) if skip < len(frames) else "".join(tb)
    report = {
        "rank": rank,
        "reason": f"{type(exc).__name__}: {exc}".strip().rstrip(":"),
        "traceback": text,
    }
    sys.stderr.write(text)
    sys.stderr.flush()
    with contextlib.suppress(OSError, EOFError, ValueError):
        send(chan, Kind.ERROR, report)
        # Stay alive until the task kills us on the driver's ABORT: the driver then has this
        # report before any peer can notice our exit and fail on its own (Open MPI ranks
        # abort when a peer's connection drops), so the first failure named is the real one.
        chan.settimeout(REPORT_WAIT_S)
        while recv(chan)[0] is not Kind.ABORT:
            pass


def main() -> None:
    spare = "--spare" in sys.argv
    _die_with_parent()
    if spare:
        from sparkmpi.runner.spare import ensure_mpi_initialized, preload, wait_for_job

        _set_name(SPARE_NAME)
        preload()
        wait_for_job()
        ensure_mpi_initialized()
    _set_name(PROCESS_NAME)
    rank = int(os.environ.get("SPARKMPI_RANK", "0"))
    chan = socket.socket(fileno=int(os.environ["SPARKMPI_CHANNEL_FD"]))
    os.set_inheritable(chan.fileno(), False)
    if "PMI_FD" in os.environ:  # PMI-1 libraries; an Open MPI rank has a PMIx host instead
        os.set_inheritable(int(os.environ["PMI_FD"]), False)
    try:
        kind, job = recv(chan)
        if kind is not Kind.JOB or not isinstance(job, dict):
            raise RuntimeError(f"expected a JOB frame, got {kind!r}")
        if job["mode"] == "script":
            _run_script(*job["script"])
        else:
            fn = pickle.loads(job["fn"]) if job["mode"] == "run" else None
            from mpi4py import MPI

            comm = MPI.COMM_WORLD
            if fn is None:
                _serve_session(chan, comm)
            else:
                _run_function(chan, fn, comm)
        _finalize_mpi()
        send(chan, Kind.DONE)
    except BaseException as exc:
        _report(chan, rank, exc)
        # Skip MPI_Finalize: the other ranks may be blocked in a collective with us.
        os._exit(1)
    # Interpreter teardown adds nothing once MPI is finalized and the task has our results.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _finalize_mpi() -> None:
    mpi4py_mpi = sys.modules.get("mpi4py.MPI")
    if mpi4py_mpi is not None and mpi4py_mpi.Is_initialized() and not mpi4py_mpi.Is_finalized():
        mpi4py_mpi.Finalize()


if __name__ == "__main__":
    main()
