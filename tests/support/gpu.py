"""Test support for GPU workers on machines without a GPU.

``GpuKeys`` is a heartbeat source for ``Worker(metrics=...)`` that sends the keys a worker with
pynvml and rmm sends (``gpu_memory_used``, ``gpu-memory-total``, ``gpu_utilization``, ``rmm``)
with values the test sets. ``DeviceTierStore`` stands in for dask-cuda's ``DeviceHostFile``,
which cannot be installed without CUDA: it has the same attributes the preload reads
(``device_buffer`` a ``zict.Buffer`` weighted by sizeof, ``device_keys``, ``others``, ``disk``)
and puts values of type ``DeviceBytes`` in its device tier, as ``DeviceHostFile`` does with
CuPy arrays. Both are the fault-free shape of what a GPU worker reports; the real thing runs in
the tests marked ``gpu``.
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from typing import Any

import zict
from distributed import Worker
from distributed.sizeof import safe_sizeof

__all__ = ["DeviceBytes", "DeviceTierStore", "GpuKeys", "gpu_worker"]


class GpuKeys:
    """The GPU entries of a heartbeat, settable by the test (one instance per worker)."""

    def __init__(
        self,
        used: int,
        total: int,
        utilization: float,
        rmm: tuple[int, int] | None = None,
    ) -> None:
        self.used, self.total, self.utilization, self.rmm = used, total, utilization, rmm

    def metrics(self) -> dict[str, Any]:
        """The ``Worker(metrics=...)`` argument: one callable per key."""
        out: dict[str, Any] = {
            "gpu_memory_used": lambda w: self.used,
            "gpu-memory-total": lambda w: self.total,
            "gpu_utilization": lambda w: self.utilization,
        }
        if self.rmm is not None:
            out["rmm"] = lambda w: {"rmm-used": self.rmm[0], "rmm-total": self.rmm[1]}  # type: ignore[index]
        return out


class DeviceBytes(bytes):
    """A value the stand-in storage keeps in its device tier (a CuPy array's role)."""


class DeviceTierStore(MutableMapping[Any, Any]):
    """DeviceHostFile's shape: a device tier (a zict.Buffer with a limit, spilling to the host
    dict) and a host dict; no disk tier used here, no spillable ``others``."""

    def __init__(self, device_memory_limit: int = 2**30) -> None:
        self.host: dict[Any, Any] = {}
        self.device_buffer: zict.Buffer[Any, Any] = zict.Buffer(
            {}, self.host, device_memory_limit, weight=lambda k, v: safe_sizeof(v)
        )
        self.device_keys: set[Any] = set()
        self.others: dict[Any, Any] = {}
        self.disk: dict[Any, Any] = {}

    def __setitem__(self, key: Any, value: Any) -> None:
        if key in self:
            del self[key]
        if isinstance(value, DeviceBytes):
            self.device_keys.add(key)
            self.device_buffer[key] = value
        else:
            self.host[key] = value

    def __getitem__(self, key: Any) -> Any:
        if key in self.device_keys:
            return self.device_buffer[key]
        return self.host[key]

    def __delitem__(self, key: Any) -> None:
        if key in self.device_keys:
            self.device_keys.discard(key)
            del self.device_buffer[key]
        else:
            del self.host[key]

    def __iter__(self) -> Iterator[Any]:
        yield from self.device_keys
        yield from (k for k in self.host if k not in self.device_keys)

    def __len__(self) -> int:
        return len(self.device_keys) + sum(k not in self.device_keys for k in self.host)


def gpu_worker(scheduler: str, keys: GpuKeys, device_memory_limit: int) -> Worker:
    """An in-process worker named ``gpu`` that reports ``keys`` in its heartbeats and keeps its
    data in a ``DeviceTierStore`` with the preload ``dask_memory_exporter.gpu``, as a dask-cuda
    worker started with it would (use it with ``async with``)."""
    return Worker(
        scheduler,
        name="gpu",
        nthreads=1,
        host="127.0.0.1",
        metrics=keys.metrics(),
        data=(DeviceTierStore, {"device_memory_limit": device_memory_limit}),
        preload=["dask_memory_exporter.gpu"],
    )
