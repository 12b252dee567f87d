"""A one-client PMIx server host: ``python -m sparkmpi.pmix.host PREFIX``.

It serves exactly one Open MPI rank. Upstream it is that rank in sparkmpi's PMI-1 job (the
admitted socket is inherited as ``PMI_FD``, with ``PMI_RANK`` and ``PMI_SIZE``); downstream it
runs libpmix's server for the rank. Protocol with the parent (:func:`sparkmpi.pmix.start_host`):
once ready it writes one JSON line on stdout, ``{"env": {...}}`` (the client's PMIx
environment) or ``{"error": "..."}``, and it exits when the rank has finalized, when the PMI
server closes the connection, or when its stdin reaches EOF (the parent closed it or died).
"""

from __future__ import annotations

import ctypes as C
import json
import os
import queue
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from sparkmpi.pmix import abi
from sparkmpi.pmix.upstream import PMIUpstream, UpstreamError

UNSUPPORTED = (
    "{what} is not supported with runtime 'openmpi' (spark-mpi's PMIx host serves one job); "
    "run programs that need it with runtime 'mpich' or 'impi'"
)
FINALIZE_GRACE_S = 0.3
"""How long the host lingers after the rank's finalize, so libpmix can send the rank its ack."""


def _log(message: str) -> None:
    print(f"sparkmpi.pmix.host[{os.environ.get('PMI_RANK', '?')}]: {message}", file=sys.stderr)


def job_info(nspace: str, rank: int, nodes: list[int]) -> abi.InfoArray:
    """The job-, node- and process-level data registered for ``nspace``: what Open MPI reads
    at ``MPI_Init`` (sizes, which ranks share this rank's node, each rank's node and local
    rank). Node ``n`` other than this one is named ``sparkmpi-node<n>``."""
    size, mine = len(nodes), nodes[rank]
    peers = [r for r in range(size) if nodes[r] == mine]
    names = {n: (socket.gethostname() if n == mine else f"sparkmpi-node{n}") for n in nodes}
    local_rank = {r: [p for p in range(size) if nodes[p] == nodes[r]].index(r) for r in range(size)}
    procs = [
        abi.InfoArray(
            [
                (abi.RANK, abi.PROC_RANK, r),
                (abi.GLOBAL_RANK, abi.PROC_RANK, r),
                (abi.APP_RANK, abi.PROC_RANK, r),
                (abi.LOCAL_RANK, abi.UINT16, local_rank[r]),
                (abi.NODE_RANK, abi.UINT16, local_rank[r]),
                (abi.NODEID, abi.UINT32, nodes[r]),
                (abi.HOSTNAME, abi.STRING, names[nodes[r]]),
                (abi.APPNUM, abi.UINT32, 0),
            ]
        )
        for r in range(size)
    ]
    items: list[abi.Item] = [
        (abi.UNIV_SIZE, abi.UINT32, size),
        (abi.JOB_SIZE, abi.UINT32, size),
        (abi.MAX_PROCS, abi.UINT32, size),
        (abi.APP_SIZE, abi.UINT32, size),
        (abi.JOB_NUM_APPS, abi.UINT32, 1),
        (abi.APPNUM, abi.UINT32, 0),
        (abi.APPLDR, abi.PROC_RANK, 0),
        (abi.JOBID, abi.STRING, nspace),
        (abi.NUM_NODES, abi.UINT32, len(set(nodes))),
        (abi.NODE_LIST, abi.STRING, ",".join(names[n] for n in sorted(set(nodes)))),
        (abi.LOCAL_SIZE, abi.UINT32, len(peers)),
        (abi.NODE_SIZE, abi.UINT32, len(peers)),
        (abi.LOCAL_PEERS, abi.STRING, ",".join(map(str, peers))),
        (abi.LOCALLDR, abi.PROC_RANK, peers[0]),
        (abi.HOSTNAME, abi.STRING, names[mine]),
        (abi.NODEID, abi.UINT32, mine),
    ]
    items += [(abi.PROC_INFO_ARRAY, abi.DATA_ARRAY, p) for p in procs]
    return abi.InfoArray(items)


class Host:
    """The server module callbacks and the worker thread that does their PMI-1 I/O.

    Callbacks run on libpmix's progress thread: they only copy their arguments and queue work.
    """

    def __init__(self, lib: C.CDLL, upstream: PMIUpstream) -> None:
        self.lib = lib
        self.upstream = upstream
        self.done = threading.Event()
        self.reason = ""
        self.work: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._fences = 0
        self._buffers: dict[int, C.Array] = {}
        self._release = abi.ReleaseCbFunc(self._released)
        self._callbacks = [
            abi.ClientConnectedFn(self._connected),
            abi.ClientFinalizedFn(self._finalized),
            abi.AbortFn(self._abort),
            abi.FenceNbFn(self._fence),
            abi.DirectModexFn(self._dmodex),
            abi.SpawnFn(self._spawn),
            abi.ConnectFn(self._connect),
        ]
        self.module = abi.ServerModule()
        names = ("client_connected", "client_finalized", "abort", "fence_nb", "direct_modex")
        for name, fn in zip(
            (*names, "spawn", "connect"),
            self._callbacks,
            strict=True,
        ):
            setattr(self.module, name, C.cast(fn, C.c_void_p).value)

    def stop(self, reason: str) -> None:
        """Asks the host to exit; the first reason given is kept."""
        if not self.done.is_set():
            self.reason = reason
            self.done.set()

    # --- callbacks (libpmix's thread) ----------------------------------------------------------

    def _connected(self, proc, server_object, cbfunc, cbdata) -> int:
        return abi.OPERATION_SUCCEEDED

    def _finalized(self, proc, server_object, cbfunc, cbdata) -> int:
        self.work.put(self._do_finalize)
        return abi.OPERATION_SUCCEEDED

    def _abort(self, proc, server_object, status, msg, procs, nprocs, cbfunc, cbdata) -> int:
        text = (msg or b"").decode(errors="replace")
        self.work.put(lambda: self._do_abort(int(status), text))
        return abi.OPERATION_SUCCEEDED

    def _fence(self, procs, nprocs, info, ninfo, data, ndata, cbfunc, cbdata) -> int:
        size = self.upstream.size
        ranks = {procs[i].rank for i in range(nprocs)}
        if ranks != {abi.RANK_WILDCARD} and ranks != set(range(size)):
            _log(f"fence over ranks {sorted(ranks)} is not supported (only all ranks)")
            return abi.ERR_NOT_SUPPORTED
        blob = C.string_at(data, ndata) if data and ndata else b""
        self.work.put(lambda: self._do_fence(blob, cbfunc, cbdata))
        return abi.SUCCESS

    def _dmodex(self, proc, info, ninfo, cbfunc, cbdata) -> int:
        # All data travels in fences; a direct request means the key was never published.
        return abi.ERR_NOT_FOUND

    def _spawn(self, proc, job_info, ninfo, apps, napps, cbfunc, cbdata) -> int:
        _log(UNSUPPORTED.format(what="MPI_Comm_spawn"))
        return abi.ERR_NOT_SUPPORTED

    def _connect(self, procs, nprocs, info, ninfo, cbfunc, cbdata) -> int:
        _log(UNSUPPORTED.format(what="MPI_Comm_connect/accept between jobs"))
        return abi.ERR_NOT_SUPPORTED

    def _released(self, cbdata) -> None:
        self._buffers.pop(cbdata or 0, None)

    # --- work (the worker thread) --------------------------------------------------------------

    def _do_fence(self, blob: bytes, cbfunc: int, cbdata: int | None) -> None:
        self._fences += 1
        status = abi.SUCCESS
        try:
            joined = b"".join(self.upstream.allgather(f"pmix-f{self._fences}", blob))
        except UpstreamError as exc:
            _log(f"fence failed: {exc}")
            joined, status = b"", abi.ERROR
            self.stop(f"PMI server lost during a fence: {exc}")
        buffer = C.create_string_buffer(joined, max(1, len(joined)))
        self._buffers[self._fences] = buffer
        abi.ModexCbFunc(cbfunc)(
            status,
            C.addressof(buffer) if joined else None,
            len(joined),
            cbdata,
            C.cast(self._release, C.c_void_p).value,
            self._fences,
        )

    def _do_finalize(self) -> None:
        try:
            self.upstream.finalize()
        except UpstreamError as exc:
            _log(f"finalize not acknowledged: {exc}")
        time.sleep(FINALIZE_GRACE_S)
        self.stop("the rank finalized")

    def _do_abort(self, status: int, message: str) -> None:
        try:
            self.upstream.abort(status, message)
        except UpstreamError as exc:
            _log(f"cannot pass the abort on: {exc}")
        time.sleep(FINALIZE_GRACE_S)
        self.stop(f"the rank aborted with {status}")

    def run_worker(self) -> None:
        """Runs queued work until ``None`` is queued; between jobs notices a closed server."""
        while True:
            try:
                job = self.work.get(timeout=0.5)
            except queue.Empty:
                if not self.done.is_set() and self.upstream.peer_closed():
                    self.stop("the PMI server closed the connection")
                continue
            if job is None:
                return
            job()


def _watch_stdin(host: Host) -> None:
    try:
        while os.read(0, 4096):
            pass
    except OSError:
        pass
    host.stop("the parent closed stdin")


def _announce(payload: dict[str, object]) -> None:
    """Writes the one line the parent reads, then points stdout at /dev/null."""
    try:
        sys.stdout.write(json.dumps(payload) + "\n")
        sys.stdout.flush()
    except OSError:
        pass
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)


def serve(prefix: Path, sock: socket.socket, rank: int, size: int, tmpdir: Path) -> int:
    """Sets up the PMIx server for ``rank``, announces the client's environment and serves the
    rank until one of the exit conditions; returns the host's exit status."""
    upstream = PMIUpstream(sock, rank, size)
    upstream.init()
    nodes = upstream.node_of_each_rank()
    lib = abi.load(prefix)
    host = Host(lib, upstream)
    init_info = abi.InfoArray(
        [(abi.SERVER_TMPDIR, abi.STRING, str(tmpdir)), (abi.SYSTEM_TMPDIR, abi.STRING, str(tmpdir))]
    )
    abi.check(lib, lib.PMIx_server_init(C.byref(host.module), init_info.pointer, init_info.size),
              "PMIx_server_init")  # fmt: skip
    try:
        nspace = upstream.kvsname
        info = job_info(nspace, rank, nodes)
        rc = lib.PMIx_server_register_nspace(
            nspace.encode(), 1, info.pointer, info.size, None, None
        )
        abi.check(lib, rc, "PMIx_server_register_nspace")
        proc = abi.Proc(nspace.encode(), rank)
        uid, gid = abi.os_ids()
        rc = lib.PMIx_server_register_client(C.byref(proc), uid, gid, None, None, None)
        abi.check(lib, rc, "PMIx_server_register_client")
        env = abi.setup_fork(lib, proc)
        threading.Thread(target=_watch_stdin, args=(host,), daemon=True).start()
        worker = threading.Thread(target=host.run_worker, daemon=True)
        worker.start()
        _announce({"env": env})
        host.done.wait()
        if host.reason != "the rank finalized":
            _log(f"exiting: {host.reason}")
        host.work.put(None)
        worker.join(timeout=5)
    finally:
        finalizer = threading.Thread(target=lib.PMIx_server_finalize, daemon=True)
        finalizer.start()
        finalizer.join(timeout=5)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point; see the module docstring for the contract with the parent."""
    args = sys.argv[1:] if argv is None else argv
    prefix = Path(args[0] if args else os.environ.get("SPARKMPI_OMPI_PREFIX", "/opt/sparkmpi-ompi"))
    # the parent's directory (mode 0700) when given; it removes it too, if we are killed
    tmpdir = Path(args[1]) if len(args) > 1 else Path(tempfile.mkdtemp(prefix="sparkmpi-pmix-"))
    try:
        sock = socket.socket(fileno=int(os.environ["PMI_FD"]))
        rank, size = int(os.environ["PMI_RANK"]), int(os.environ["PMI_SIZE"])
        return serve(prefix, sock, rank, size, tmpdir)
    except Exception as exc:  # the parent must hear why, whatever failed
        _announce({"error": f"{type(exc).__name__}: {exc}"})
        _log(f"failed: {exc}")
        return 1
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


if __name__ == "__main__":
    sys.stdout.flush()
    os._exit(main())
