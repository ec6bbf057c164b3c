"""The GPU rows of both dashboards: device memory, its limit, RMM pools and utilization.

Shown only where GPU series exist: the row is collapsed and repeated over the hidden variable
``gpu``, whose values are the names of the device-memory family among the selected series.
Without GPU workers the variable is empty and the row has nothing to repeat over; its panels
query only GPU families, so they would be empty anyway.
"""

from __future__ import annotations

from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import timeseries
from grafana_foundation_sdk.models import dashboard as dm

from .. import names as n
from ..gpu_nvml import WORKER_GPU_PROCESS_MEMORY_BYTES
from ..heartbeat import (
    WORKER_BREAKDOWN_APPROXIMATE,
    WORKER_GPU_MANAGED_BYTES,
    WORKER_GPU_MEMORY_LIMIT_BYTES,
    WORKER_GPU_MEMORY_TOTAL_BYTES,
    WORKER_GPU_MEMORY_USED_BYTES,
    WORKER_GPU_RMM_POOL_BYTES,
    WORKER_GPU_RMM_USED_BYTES,
    WORKER_GPU_UTILIZATION_RATIO,
)
from .panels import DS, line_style, target, ts_panel
from .queries import GPU_VAR

__all__ = ["GPU_VAR", "gpu_row", "gpu_variable"]

_W = "{{" + n.LABEL_WORKER_NAME + "}}"


def gpu_variable(sel: str) -> db.QueryVariable:
    """Hidden; non-empty exactly when some selected worker reports device memory."""
    return (
        db.QueryVariable(GPU_VAR)
        .label("GPU")
        .description("Set when the selected workers report GPU device memory (hidden)")
        .datasource(DS)
        .query(f"label_values({WORKER_GPU_MEMORY_TOTAL_BYTES}{sel}, __name__)")
        .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .hide(dm.VariableHide.HIDE_VARIABLE)
    )


def gpu_row(sel: str, per_worker: bool) -> db.Row:
    """The collapsed GPU row for workers selected by ``sel``. ``per_worker`` (the worker
    dashboard) draws the limit, total and managed-on-device lines of each worker; the cluster
    dashboard draws each worker's share of its device instead."""
    row = (
        db.Row("GPU (workers that report a device)")
        .collapsed(True)
        .repeat(GPU_VAR)
        .with_panel(_memory(sel) if per_worker else _share(sel))
        .with_panel(_rmm(sel))
        .with_panel(_utilization(sel))
    )
    if per_worker:
        row = row.with_panel(_approximate(sel))
    return row


def _memory(sel: str) -> timeseries.Panel:
    return (
        ts_panel(
            "Device memory",
            "Device memory in use on the worker's GPU (every process on the device, as NVML "
            "counts it), the device's total, dask-cuda's device_memory_limit (where "
            "DeviceHostFile starts spilling to host memory; with the dask_memory_exporter.gpu "
            "preload), the managed data held on the device, and in the sidecar modes with NVML "
            "the worker process's own device memory.",
            "bytes",
        )
        .with_target(target(f"{WORKER_GPU_MEMORY_USED_BYTES}{sel}", "A", "used " + _W))
        .with_target(target(f"{WORKER_GPU_MANAGED_BYTES}{sel}", "B", "managed on device " + _W))
        .with_target(target(f"{WORKER_GPU_MEMORY_LIMIT_BYTES}{sel}", "C", "limit " + _W))
        .with_target(target(f"{WORKER_GPU_MEMORY_TOTAL_BYTES}{sel}", "D", "total " + _W))
        .with_target(target(f"{WORKER_GPU_PROCESS_MEMORY_BYTES}{sel}", "E", "worker process " + _W))
        .override_by_regexp("^limit .*", line_style("orange"))
        .override_by_regexp("^total .*", line_style("red"))
        .height(8)
        .span(12)
    )


def _share(sel: str) -> timeseries.Panel:
    return (
        ts_panel(
            "Device memory of total",
            "Device memory in use as a share of each worker's device (every process on the "
            "device). An RMM pool counts as used from the start: compare with the RMM panel.",
            "percentunit",
        )
        .with_target(
            target(
                f"{WORKER_GPU_MEMORY_USED_BYTES}{sel} / {WORKER_GPU_MEMORY_TOTAL_BYTES}{sel}",
                "A",
                _W,
            )
        )
        .max(1)
        .height(8)
        .span(12)
    )


def _rmm(sel: str) -> timeseries.Panel:
    return (
        ts_panel(
            "RMM: in use and pool",
            "What RMM has allocated (in use) against what it holds (the pool's reservation): "
            "NVML's used figure includes the whole pool, so a full-looking device with a low "
            "in-use line has room. Only where rmm is importable on the workers.",
            "bytes",
        )
        .with_target(target(f"{WORKER_GPU_RMM_USED_BYTES}{sel}", "A", "in use " + _W))
        .with_target(target(f"{WORKER_GPU_RMM_POOL_BYTES}{sel}", "B", "pool " + _W))
        .override_by_regexp("^pool .*", line_style("purple"))
        .height(8)
        .span(6)
    )


def _utilization(sel: str) -> timeseries.Panel:
    return (
        ts_panel("GPU utilization", "GPU utilization of each worker's device.", "percentunit")
        .with_target(target(f"{WORKER_GPU_UTILIZATION_RATIO}{sel}", "A", _W))
        .max(1)
        .height(8)
        .span(6)
    )


def _approximate(sel: str) -> timeseries.Panel:
    return (
        ts_panel(
            "Host breakdown approximate",
            "1: managed and unmanaged host memory are approximate on this worker, because its "
            "managed bytes count device objects and data dask-cuda spilled to disk (run the "
            "workers with --preload dask_memory_exporter.gpu to correct it where it can). "
            "0: corrected.",
            "short",
        )
        .with_target(target(f"{WORKER_BREAKDOWN_APPROXIMATE}{sel}", "A", _W))
        .max(1)
        .height(8)
        .span(24)
    )
