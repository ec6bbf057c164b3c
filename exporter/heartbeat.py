"""Per-worker gauges read from the heartbeat's ``metrics``, beyond the memory breakdown.

Every worker's heartbeat carries a ``metrics`` dict that reaches the exporter unchanged in
the scheduler's ``identity`` answer (``Worker.get_metrics``: task counts, event-loop interval,
transfers, custom ``Worker(metrics=...)`` entries …). Each entry of :data:`HEARTBEAT_GAUGES`
declares one family and how to read it from that dict; the scheduler source decodes them
all, and the collector, the landing page and the worker dashboard pick them up from the
declaration. A worker whose heartbeat lacks a key, or carries a value that is not a finite
number, gets no series of that family, never a 0: one odd entry hides nothing else.

Adding a heartbeat family is one entry here, its test, and regenerated dashboards.

The GPU families (:data:`GPU_GAUGES`: device memory, RMM, dask-cuda's limit, see docs/gpu.md)
are read the same way and drawn in the dashboards' GPU rows; :func:`device_managed` is the one
figure that also changes the memory breakdown (the scheduler source subtracts it from managed).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .gpu import GPU_KEY
from .names import Metric, worker_gauge

__all__ = [
    "GPU_GAUGES",
    "HEARTBEAT_GAUGES",
    "WORKER_BREAKDOWN_APPROXIMATE",
    "WORKER_EXECUTING_TASKS",
    "WORKER_GPU_MANAGED_BYTES",
    "WORKER_GPU_MEMORY_LIMIT_BYTES",
    "WORKER_GPU_MEMORY_TOTAL_BYTES",
    "WORKER_GPU_MEMORY_USED_BYTES",
    "WORKER_GPU_RMM_POOL_BYTES",
    "WORKER_GPU_RMM_USED_BYTES",
    "WORKER_GPU_UTILIZATION_RATIO",
    "HeartbeatGauge",
    "device_managed",
    "read_heartbeat",
]


@dataclass(frozen=True, slots=True)
class HeartbeatGauge:
    """One per-worker gauge and how to read it from a heartbeat's ``metrics``."""

    metric: Metric
    read: Callable[[Mapping[str, Any]], Any]
    """Returns the raw value; a KeyError, TypeError or non-number means "not reported"."""
    key: str | None = None
    """The top-level heartbeat key ``read`` needs: where it is absent (a CPU worker and the GPU
    keys) the gauge is skipped without calling ``read``, which would raise at some cost per
    worker and gauge on every poll."""


WORKER_EXECUTING_TASKS = worker_gauge(
    "dask_memory_worker_executing_tasks",
    "Tasks executing on the worker at its last heartbeat: their working memory is the "
    "task heap, unmanaged until they finish.",
)


# --- GPU workers (dask-cuda) ---------------------------------------------------------------
# A worker with pynvml and a device sends gpu_memory_used, gpu-memory-total (with a hyphen)
# and gpu_utilization (percent) from its system monitor; with rmm importable, an "rmm" entry
# ({"rmm-used", "rmm-total"}, distributed/diagnostics/rmm.py); with the preload
# dask_memory_exporter.gpu, the entry GPU_KEY (exporter/gpu.py). A CPU worker sends none.
WORKER_GPU_MEMORY_USED_BYTES = worker_gauge(
    "dask_memory_worker_gpu_memory_used_bytes",
    "Device memory in use on the worker's GPU, in bytes, as NVML reports it: every process "
    "on the device, not only this worker (the heartbeat's gpu_memory_used).",
    unit="bytes",
)
WORKER_GPU_MEMORY_TOTAL_BYTES = worker_gauge(
    "dask_memory_worker_gpu_memory_total_bytes",
    "Total device memory of the worker's GPU in bytes (the heartbeat's gpu-memory-total).",
    unit="bytes",
)
WORKER_GPU_UTILIZATION_RATIO = worker_gauge(
    "dask_memory_worker_gpu_utilization_ratio",
    "GPU utilization of the worker's device, 0 to 1 (the heartbeat's gpu_utilization / 100).",
    unit="ratio",
)
WORKER_GPU_MEMORY_LIMIT_BYTES = worker_gauge(
    "dask_memory_worker_gpu_memory_limit_bytes",
    "dask-cuda's device_memory_limit in bytes: where its DeviceHostFile starts spilling "
    "device data to host memory (only with the dask_memory_exporter.gpu preload, and only "
    "where a limit is set).",
    unit="bytes",
)
WORKER_GPU_MANAGED_BYTES = worker_gauge(
    "dask_memory_worker_gpu_managed_bytes",
    "Managed data held in device memory in bytes: sizeof of the keys in dask-cuda's device "
    "tier (only with the dask_memory_exporter.gpu preload).",
    unit="bytes",
)
WORKER_GPU_RMM_USED_BYTES = worker_gauge(
    "dask_memory_worker_gpu_rmm_used_bytes",
    "Device memory allocated through RMM in bytes: what is in use, within a pool or not "
    "(the heartbeat's rmm.rmm-used).",
    unit="bytes",
)
WORKER_GPU_RMM_POOL_BYTES = worker_gauge(
    "dask_memory_worker_gpu_rmm_pool_bytes",
    "Device memory RMM holds in bytes: the pool's reservation, or what is allocated where "
    "it is larger (the heartbeat's rmm.rmm-total). NVML counts all of it as used.",
    unit="bytes",
)
WORKER_BREAKDOWN_APPROXIMATE = worker_gauge(
    "dask_memory_worker_breakdown_approximate",
    "1 where the host memory breakdown (managed, unmanaged) is approximate: a GPU worker "
    "whose managed bytes count device objects and data dask-cuda spilled to disk; 0 where "
    "the dask_memory_exporter.gpu preload corrected it; absent on CPU workers.",
)

_GPU_SIGNS = frozenset(("gpu_memory_used", "gpu-memory-total", "gpu_utilization", "rmm", GPU_KEY))


def _approximate(m: Mapping[str, Any]) -> float | None:
    """0 where the preload's report makes the host breakdown exact, 1 on other GPU workers;
    None (no series) on a worker that shows no sign of a GPU."""
    if m.keys().isdisjoint(_GPU_SIGNS):  # a CPU worker: the common case, kept cheap
        return None
    report = m.get(GPU_KEY)
    if isinstance(report, Mapping) and report.get("exact") is True:
        return 0.0
    if any(m.get(k) is not None for k in _GPU_SIGNS):
        return 1.0
    return None


def device_managed(m: Mapping[str, Any]) -> int:
    """Managed bytes the worker holds in device memory, which its ``managed_bytes`` counts
    although they are not in its RSS: the preload's figure where it reports an exact one,
    else 0 (the breakdown is then flagged approximate)."""
    report = m.get(GPU_KEY)
    if not isinstance(report, Mapping) or report.get("exact") is not True:
        return 0
    v = report.get("device-bytes")
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
        return 0
    return int(v)


GPU_GAUGES: tuple[HeartbeatGauge, ...] = (
    HeartbeatGauge(WORKER_GPU_MEMORY_USED_BYTES, lambda m: m["gpu_memory_used"], "gpu_memory_used"),
    HeartbeatGauge(
        WORKER_GPU_MEMORY_TOTAL_BYTES, lambda m: m["gpu-memory-total"], "gpu-memory-total"
    ),
    HeartbeatGauge(
        WORKER_GPU_UTILIZATION_RATIO, lambda m: m["gpu_utilization"] / 100, "gpu_utilization"
    ),
    HeartbeatGauge(
        WORKER_GPU_MEMORY_LIMIT_BYTES, lambda m: m[GPU_KEY]["device-memory-limit"], GPU_KEY
    ),
    HeartbeatGauge(WORKER_GPU_MANAGED_BYTES, lambda m: m[GPU_KEY]["device-bytes"], GPU_KEY),
    HeartbeatGauge(WORKER_GPU_RMM_USED_BYTES, lambda m: m["rmm"]["rmm-used"], "rmm"),
    HeartbeatGauge(WORKER_GPU_RMM_POOL_BYTES, lambda m: m["rmm"]["rmm-total"], "rmm"),
    HeartbeatGauge(WORKER_BREAKDOWN_APPROXIMATE, _approximate),
)
"""The GPU families: drawn in the dashboards' GPU rows rather than the heartbeat row."""

HEARTBEAT_GAUGES: tuple[HeartbeatGauge, ...] = (
    # task_counts counts the worker's tasks by state; a state with no task is absent: 0.
    HeartbeatGauge(WORKER_EXECUTING_TASKS, lambda m: m["task_counts"].get("executing", 0)),
    *GPU_GAUGES,
)


def read_heartbeat(
    metrics: Mapping[str, Any], gauges: tuple[HeartbeatGauge, ...] = HEARTBEAT_GAUGES
) -> dict[Metric, float]:
    """The values of every declared gauge this heartbeat reports (finite numbers only)."""
    out: dict[Metric, float] = {}
    for g in gauges:
        if g.key is not None and g.key not in metrics:
            continue
        try:
            v = g.read(metrics)
        except (KeyError, TypeError, IndexError, AttributeError, ValueError):
            continue
        if isinstance(v, bool) or not isinstance(v, int | float):
            continue
        v = float(v)
        if math.isfinite(v):
            out[g.metric] = v
    return out
