"""GPU figures decoded from heartbeats, and the worker preload's report on real zict storage."""

from __future__ import annotations

from typing import Any

import pytest
from distributed.sizeof import safe_sizeof

from dask_memory_exporter.gpu import GPU_KEY, dask_setup, storage_report
from dask_memory_exporter.heartbeat import (
    WORKER_BREAKDOWN_APPROXIMATE,
    WORKER_EXECUTING_TASKS,
    WORKER_GPU_MANAGED_BYTES,
    WORKER_GPU_MEMORY_LIMIT_BYTES,
    WORKER_GPU_MEMORY_TOTAL_BYTES,
    WORKER_GPU_MEMORY_USED_BYTES,
    WORKER_GPU_RMM_POOL_BYTES,
    WORKER_GPU_RMM_USED_BYTES,
    WORKER_GPU_UTILIZATION_RATIO,
    device_managed,
    read_heartbeat,
)
from dask_memory_exporter.scheduler import decode_worker
from tests.support.gpu import DeviceBytes, DeviceTierStore

MiB = 2**20
GiB = 2**30
NVML = {"gpu_memory_used": 9_790_000_000, "gpu-memory-total": 150 * GiB, "gpu_utilization": 37}


def test_gpu_keys_as_a_gpu_worker_sends_them() -> None:
    values = read_heartbeat({**NVML, "rmm": {"rmm-used": GiB, "rmm-total": 8 * GiB}})
    assert values == {
        WORKER_GPU_MEMORY_USED_BYTES: 9_790_000_000,
        WORKER_GPU_MEMORY_TOTAL_BYTES: 150 * GiB,
        WORKER_GPU_UTILIZATION_RATIO: 0.37,
        WORKER_GPU_RMM_USED_BYTES: GiB,
        WORKER_GPU_RMM_POOL_BYTES: 8 * GiB,
        WORKER_BREAKDOWN_APPROXIMATE: 1,
    }


def test_a_cpu_worker_has_no_gpu_series() -> None:
    assert read_heartbeat({"task_counts": {"executing": 2}, "memory": 1}) == {
        WORKER_EXECUTING_TASKS: 2
    }


@pytest.mark.parametrize(
    ("metrics", "expected"),
    [
        # NVML may give no utilization (MIG): that series only is missing
        ({**NVML, "gpu_utilization": None}, {"used", "total", "approx"}),
        # a worker where only RMM is importable still shows a GPU
        ({"rmm": {"rmm-used": 1, "rmm-total": 2}}, {"rmm_used", "rmm_pool", "approx"}),
        ({"rmm": {"rmm-used": None, "rmm-total": None}}, {"approx"}),
        ({"gpu-memory-total": "16GB"}, {"approx"}),
        ({"gpu_memory_used": float("inf")}, {"approx"}),
    ],
)
def test_odd_gpu_values_hide_only_themselves(metrics: dict[str, Any], expected: set[str]) -> None:
    short = {
        WORKER_GPU_MEMORY_USED_BYTES: "used",
        WORKER_GPU_MEMORY_TOTAL_BYTES: "total",
        WORKER_GPU_UTILIZATION_RATIO: "util",
        WORKER_GPU_RMM_USED_BYTES: "rmm_used",
        WORKER_GPU_RMM_POOL_BYTES: "rmm_pool",
        WORKER_BREAKDOWN_APPROXIMATE: "approx",
    }
    assert {short[m] for m in read_heartbeat(metrics)} == expected


def _entry(metrics: dict[str, Any]) -> dict[str, Any]:
    base = {
        "memory": 500 * MiB,
        "managed_bytes": 300 * MiB,
        "spilled_bytes": {"memory": 0, "disk": 0},
    }
    return {"name": "w", "memory_limit": GiB, "last_seen": 1.0, "metrics": {**base, **metrics}}


def test_an_exact_preload_report_takes_device_bytes_out_of_managed() -> None:
    report = {"storage": "DeviceHostFile", "device-memory-limit": 4 * GiB,
              "device-bytes": 200 * MiB, "exact": True}  # fmt: skip
    metrics = {**NVML, GPU_KEY: report}
    w = decode_worker("tcp://w:1", _entry(metrics))
    assert w.reading.managed == 100 * MiB
    assert read_heartbeat(metrics) == {
        **read_heartbeat(NVML),
        WORKER_GPU_MEMORY_LIMIT_BYTES: 4 * GiB,
        WORKER_GPU_MANAGED_BYTES: 200 * MiB,
        WORKER_BREAKDOWN_APPROXIMATE: 0,
    }


@pytest.mark.parametrize(
    "report",
    [
        {"storage": "DeviceHostFile", "device-bytes": 200 * MiB, "exact": False},
        {"storage": "DeviceHostFile", "device-bytes": -1, "exact": True},
        None,  # the preload ran on a worker that is not a DeviceHostFile
        "garbage",
    ],
)
def test_no_correction_without_an_exact_report(report: Any) -> None:
    metrics = {**NVML, GPU_KEY: report}
    assert decode_worker("tcp://w:1", _entry(metrics)).reading.managed == 300 * MiB
    assert device_managed(metrics) == 0
    exact = isinstance(report, dict) and report["exact"]
    assert read_heartbeat(metrics)[WORKER_BREAKDOWN_APPROXIMATE] == (0 if exact else 1)


def test_preload_report_on_a_device_tier_with_a_limit() -> None:
    store = DeviceTierStore(device_memory_limit=64 * MiB)
    on_device, on_host = DeviceBytes(b"d" * 8 * MiB), b"h" * 3 * MiB
    store["d"], store["h"] = on_device, on_host
    assert storage_report(store) == {
        "storage": "DeviceTierStore",
        "device-memory-limit": 64 * MiB,
        "device-bytes": safe_sizeof(on_device),
        "exact": True,
    }
    store.disk["k"] = b"on disk"  # managed bytes would count it: no longer exact
    assert storage_report(store)["exact"] is False  # type: ignore[index]


def test_preload_report_without_a_limit_sums_the_device_dict() -> None:
    class NoLimit:  # DeviceHostFile(device_memory_limit=None): a plain dict device tier
        def __init__(self) -> None:
            self.device_buffer = {"a": DeviceBytes(b"x" * MiB), "b": DeviceBytes(b"y" * MiB)}
            self.device_keys = {"a", "b"}
            self.others: dict[str, Any] = {"spillable": object()}
            self.disk = None

    report = storage_report(NoLimit())
    assert report == {
        "storage": "NoLimit",
        "device-bytes": 2 * safe_sizeof(DeviceBytes(b"x" * MiB)),
        "exact": False,  # cuDF spillable objects: their place is not tracked
    }


def test_preload_reports_nothing_for_ordinary_storage() -> None:
    assert storage_report({}) is None

    class FakeWorker:
        def __init__(self) -> None:
            self.metrics: dict[str, Any] = {}
            self.data: dict[str, Any] = {}

    w = FakeWorker()
    dask_setup(w)
    assert w.metrics[GPU_KEY](w) is None
    dask_setup(object())  # a nanny (--preload-nanny): nothing to add, no error
