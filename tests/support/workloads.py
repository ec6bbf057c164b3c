"""Functions the tests run on worker processes that cannot import this package (nor ``tests``).

``diagnose`` and the remediation must work on workers without ``dask_memory_exporter``
installed, so the tests first block the import on every worker, then send their workloads
through ``Client.run``. This module is registered with cloudpickle to travel by value (only
top-level ``Client.run`` functions honour that: a task's function inside a graph is pickled
by reference).
"""

from __future__ import annotations

import os
import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager

import cloudpickle

PACKAGE = "dask_memory_exporter"
TRIM_VAR = "MALLOC_TRIM_THRESHOLD_"

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def block_package_import() -> None:
    """On a worker: make ``import dask_memory_exporter`` fail, as if it were not installed."""
    for name in [m for m in sys.modules if m == PACKAGE or m.startswith(PACKAGE + ".")]:
        del sys.modules[name]
    sys.modules[PACKAGE] = None  # type: ignore[assignment]


def fragment_heap(total: int, size: int = 2048, keep_every: int = 64) -> int:
    """On a worker: allocate ``total`` bytes of small glibc-malloc'ed objects and keep one in
    ``keep_every``, leaving the heap fragmented (``malloc_trim`` gives it back); the RSS after.
    Called again, it replaces what the previous call kept."""
    import psutil

    mod = sys.modules.setdefault("workloads_keep", types.ModuleType("workloads_keep"))
    mod.kept = None  # type: ignore[attr-defined]
    objects = [bytes(size) for _ in range(total // size)]
    mod.kept = objects[::keep_every]  # type: ignore[attr-defined]
    del objects
    return int(psutil.Process().memory_info().rss)


@contextmanager
def environ_without_trim_threshold() -> Iterator[None]:
    """While nannies start: no ``MALLOC_TRIM_THRESHOLD_`` here.

    The nanny copies its pre-spawn variables into this process's environment for good; the
    environment is restored afterwards.
    """
    saved = dict(os.environ)
    os.environ.pop(TRIM_VAR, None)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)
