"""Fixed actions that ``diagnose`` (and remediation) run inside Dask worker processes.

These functions travel to the workers through ``Client.run`` and must work on workers that do
not have this package installed. So this module is registered with cloudpickle to be pickled
*by value* (``register_pickle_by_value`` below; distributed's pickler honours that registry),
and everything here imports only the standard library and psutil, both present wherever
distributed is. Nothing in this module may import from ``dask_memory_exporter``, and no
function takes code to run: the actions are fixed, and they return plain dicts of numbers and
strings (msgpack-friendly) rather than objects of classes defined here.

They run on the worker's event loop (``Client.run`` calls a plain function there), so each is
short: a ``gc.collect()`` and a ``malloc_trim(0)`` take milliseconds to a few hundred
milliseconds on a worker of a few GiB.
"""

from __future__ import annotations

import ctypes
import gc
import os
import platform
import sys
from typing import Any

import cloudpickle
import psutil

__all__ = [
    "TRIM_THRESHOLD_VARIABLE",
    "collect_garbage",
    "diagnose_worker",
    "measure",
    "trim_allocator",
]

TRIM_THRESHOLD_VARIABLE = "MALLOC_TRIM_THRESHOLD_"
"""glibc's environment variable; the nanny sets it to 65536 before it spawns a worker."""


def _rss() -> int:
    return int(psutil.Process().memory_info().rss)


def measure(dask_worker: Any = None) -> dict[str, Any]:
    """RSS, executing tasks and the trim-threshold variable of this worker process.

    ``dask_worker`` is filled in by ``Client.run``. Tasks that seceded (``long_running``) are
    counted too: their heaps are as much task heap as the others'.
    """
    executing: int | None = None
    state = getattr(dask_worker, "state", None)
    if state is not None:
        executing = len(getattr(state, "executing", ())) + len(getattr(state, "long_running", ()))
    return {
        "pid": os.getpid(),
        "rss_bytes": _rss(),
        "executing": executing,
        "malloc_trim_threshold": os.environ.get(TRIM_THRESHOLD_VARIABLE),
    }


def collect_garbage() -> dict[str, Any]:
    """Run a full ``gc.collect()``; RSS before and after, and the objects it found unreachable.

    It runs even when the application disabled automatic collection (``gc.disable()``), which
    is one way garbage piles up.
    """
    before = _rss()
    collected = gc.collect()
    return {"rss_before": before, "rss_after": _rss(), "collected": int(collected)}


def _malloc_trim() -> Any:
    """glibc's ``malloc_trim`` through ctypes, or a string saying why it is not available."""
    if not sys.platform.startswith("linux"):
        return f"not available on {sys.platform}"
    libc, _ = platform.libc_ver()
    if libc != "glibc":
        return f"not available: the C library is not glibc ({libc or 'unknown'})"
    try:
        fn = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError) as e:
        return f"not available: {e}"
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


def trim_allocator() -> dict[str, Any]:
    """Ask glibc to give freed heap memory back to the OS (``malloc_trim(0)``).

    Since glibc 2.8 this also releases whole free pages in the middle of every arena, which is
    exactly the memory that fragmentation keeps. Where it is not available (musl, macOS,
    Windows) ``available`` is False and ``reason`` says why; nothing is run.
    """
    fn = _malloc_trim()
    if isinstance(fn, str):
        return {"available": False, "reason": fn}
    before = _rss()
    released = fn(0)
    return {
        "available": True,
        "rss_before": before,
        "rss_after": _rss(),
        "released": bool(released),  # glibc: 1 if some memory was given back
    }


def diagnose_worker(dask_worker: Any = None) -> dict[str, Any]:
    """The playbook on one worker, in order: measure, then gc, then malloc_trim."""
    out = measure(dask_worker)
    out["gc"] = collect_garbage()
    out["trim"] = trim_allocator()
    return out


cloudpickle.register_pickle_by_value(sys.modules[__name__])
