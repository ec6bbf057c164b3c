"""Per-process device memory through NVML, for the sidecar modes (optional).

The heartbeat's ``gpu_memory_used`` covers the whole device: every process on it. Beside the
workers (``--mode local`` or ``both``) the exporter can ask NVML which process holds how much
device memory, and the local source joins those pids to the worker processes it matched, as it
does for RSS: ``dask_memory_worker_gpu_process_memory_bytes``.

Optional in every way: ``pynvml`` (the ``nvidia-ml-py`` distribution, the ``gpu`` extra) may be
absent, the NVML library may be absent (no driver), there may be no device, and NVML may not
report per-process figures (``usedGpuMemory`` is unavailable without privileges, and a
container in its own pid namespace sees host pids that match none of its processes). In each
case :meth:`NvmlReader.open` returns None or the pids simply match nothing: no series, and the
exporter works as before. A failed read is logged once and reads as nothing.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from types import ModuleType
from typing import Any

from .names import worker_gauge

__all__ = ["WORKER_GPU_PROCESS_MEMORY_BYTES", "NvmlReader"]

logger = logging.getLogger(__name__)

WORKER_GPU_PROCESS_MEMORY_BYTES = worker_gauge(
    "dask_memory_worker_gpu_process_memory_bytes",
    "Device memory the worker process itself holds, in bytes, summed over devices, read "
    "through NVML by a sidecar (local and both modes; only where NVML reports per-process "
    "figures for the worker's pid).",
    unit="bytes",
)

_NA = 2**63
"""NVML_VALUE_NOT_AVAILABLE is the largest unsigned long long; no device is that large."""
_LISTS = ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses")


def _import_pynvml() -> ModuleType | None:
    try:
        return importlib.import_module("pynvml")
    except ImportError:
        return None


class NvmlReader:
    """Device memory by pid, from NVML. Blocking calls: run :meth:`read` in a thread."""

    def __init__(self, nvml: Any, handles: list[Any]) -> None:
        self.nvml = nvml
        self.handles = handles
        self._warned = False

    @classmethod
    def open(cls, load: Callable[[], ModuleType | None] = _import_pynvml) -> NvmlReader | None:
        """A reader, or None without pynvml, without the NVML library or without a device
        (logged at INFO: it is the normal case on a CPU host)."""
        nvml = load()
        if nvml is None:
            logger.debug("pynvml is not installed: no per-process device memory")
            return None
        try:
            nvml.nvmlInit()
        except Exception as e:  # NVMLError_LibraryNotFound, _DriverNotLoaded, ...
            logger.info("NVML unavailable (%s): no per-process device memory", e)
            return None
        try:
            handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
        except Exception as e:
            logger.info("NVML lists no device (%s): no per-process device memory", e)
            handles = []
        if not handles:
            _shutdown(nvml)
            return None
        logger.info("reading per-process device memory of %d GPU(s) through NVML", len(handles))
        return cls(nvml, handles)

    def read(self) -> dict[int, int]:
        """Device memory in bytes by pid, summed over devices; pids whose figure NVML does
        not report are left out. Empty if NVML fails (warned once)."""
        out: dict[int, int] = {}
        try:
            for handle in self.handles:
                seen: set[int] = set()  # a process in both lists holds one allocation
                for name in _LISTS:
                    for p in getattr(self.nvml, name)(handle):
                        used = getattr(p, "usedGpuMemory", None)
                        if p.pid in seen or not isinstance(used, int) or not 0 <= used < _NA:
                            continue  # None or NVML_VALUE_NOT_AVAILABLE: not reported
                        seen.add(p.pid)
                        out[p.pid] = out.get(p.pid, 0) + used
        except Exception as e:
            if not self._warned:
                self._warned = True
                logger.warning("reading per-process device memory through NVML failed: %s", e)
            return {}
        self._warned = False
        return out

    def close(self) -> None:
        _shutdown(self.nvml)


def _shutdown(nvml: Any) -> None:
    try:
        nvml.nvmlShutdown()
    except Exception as e:  # never let cleanup fail the exporter
        logger.debug("nvmlShutdown: %s", e)
