"""How a user's function travels to the ranks.

Functions from ``__main__``, notebooks and the user's own (not installed) modules are pickled
by value, so rank processes need not be able to import the driver's script directory;
functions of installed packages travel by reference, as in PySpark.
"""

from __future__ import annotations

import os
import site
import sys
import sysconfig
import threading
from collections.abc import Callable

import cloudpickle

_lock = threading.Lock()


def _installed_roots() -> tuple[str, ...]:
    paths = {sysconfig.get_paths()[key] for key in ("stdlib", "platstdlib", "purelib", "platlib")}
    paths.update(site.getsitepackages())
    return tuple(os.path.realpath(p) + os.sep for p in paths)


def _is_users_own(module) -> bool:
    name = getattr(module, "__name__", "")
    file = getattr(module, "__file__", None)
    if name == "__main__" or name.split(".")[0] == "sparkmpi" or not file:
        return False
    return not os.path.realpath(file).startswith(_installed_roots())


def dumps_function(fn: Callable) -> bytes:
    """``fn`` pickled so that a fresh interpreter on an executor can load it."""
    if not callable(fn):
        raise TypeError(f"the MPI function must be callable, not {type(fn).__name__}")
    module = sys.modules.get(getattr(fn, "__module__", None) or "")
    with _lock:
        by_value = module is not None and _is_users_own(module)
        if by_value:
            cloudpickle.register_pickle_by_value(module)
        try:
            return cloudpickle.dumps(fn)
        finally:
            if by_value:
                cloudpickle.unregister_pickle_by_value(module)
