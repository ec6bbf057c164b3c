"""Worker preload for dask-cuda workers: device memory limit and device-held managed bytes.

Run on the workers, not in the exporter::

    dask cuda worker tcp://scheduler:8786 --preload dask_memory_exporter.gpu
    LocalCUDACluster(preload=["dask_memory_exporter.gpu"])

Why: a worker's heartbeat carries the device's memory (``gpu_memory_used``,
``gpu-memory-total``) but nothing of dask-cuda's storage. dask-cuda replaces the worker's data
mapping with a ``DeviceHostFile`` (device, host and disk tiers, ``dask_cuda/device_host_file.py``)
whose ``device_memory_limit`` lives only in that object, and the worker's ``managed_bytes``
(``sizeof`` of every key in memory) counts CuPy/cuDF objects held on the device as if they were
in host RAM. ``DeviceHostFile`` has no ``spilled_total`` either, so keys it moved to disk still
count as managed and ``spilled_bytes`` stays 0. This preload adds one ``Worker.metrics`` entry,
:data:`GPU_KEY`, read in every heartbeat:

``storage``
    the data mapping's class name;
``device-memory-limit``
    bytes, only where dask-cuda was given a limit (its device tier is then a ``zict.Buffer``);
``device-bytes``
    ``sizeof`` of the keys in the device tier (the weights dask-cuda already keeps);
``exact``
    True when managed bytes minus ``device-bytes`` is exactly the host RAM part: nothing on
    disk and no cuDF spillable objects (their place, device or host, is not tracked here).

It is cheap: with a limit it reads totals zict maintains; without one it sums ``sizeof`` of
the device tier's values. It imports nothing beyond distributed, and reports nothing on a
worker whose data mapping is not a ``DeviceHostFile`` (the exporter then flags its breakdown as
approximate if the worker shows a GPU).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

__all__ = ["GPU_KEY", "dask_setup", "storage_report"]

logger = logging.getLogger(__name__)

GPU_KEY = "dask_memory_exporter_gpu"
"""The heartbeat entry this preload adds; ``heartbeat.py`` reads it."""


def _sizeof(value: object) -> int:
    from distributed.sizeof import safe_sizeof

    return int(safe_sizeof(value))


def storage_report(data: object) -> dict[str, Any] | None:
    """What the heartbeat should carry for a worker's data mapping; None if it is not a
    dask-cuda ``DeviceHostFile`` (recognised by its attributes, so dask-cuda need not be
    importable where this runs)."""
    device_buffer = getattr(data, "device_buffer", None)
    if device_buffer is None or not hasattr(data, "device_keys"):
        return None
    report: dict[str, Any] = {"storage": type(data).__name__}
    fast = getattr(device_buffer, "fast", None)
    if fast is not None and hasattr(fast, "total_weight"):
        # device_memory_limit set: a zict.Buffer whose fast LRU weighs keys with sizeof.
        report["device-memory-limit"] = int(device_buffer.n)
        report["device-bytes"] = int(fast.total_weight)
    elif isinstance(device_buffer, Mapping):
        # No limit: a plain dict holding only device objects.
        report["device-bytes"] = sum(_sizeof(v) for v in list(device_buffer.values()))
    else:
        return report | {"exact": False}
    others = getattr(data, "others", None) or {}
    disk = getattr(data, "disk", None) or {}
    report["exact"] = not others and not disk
    return report


def _metric(worker: Any) -> dict[str, Any] | None:
    return storage_report(worker.data)


def dask_setup(worker: Any) -> None:
    """Preload hook: add the heartbeat entry (``dask worker --preload`` calls this)."""
    if not hasattr(worker, "metrics"):  # --preload-nanny: nothing to do in the nanny
        return
    worker.metrics[GPU_KEY] = _metric
    logger.debug("dask_memory_exporter.gpu: reporting %s in heartbeats", GPU_KEY)
