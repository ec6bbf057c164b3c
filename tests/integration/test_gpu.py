"""GPU figures from real workers' heartbeats, on machines without a GPU.

The workers are real (a real scheduler, real heartbeats, the exporter over real HTTP); only the
GPU keys of their heartbeats come from ``Worker(metrics=...)`` entries with values the test
sets, because there is no device here (tests/support/gpu.py). The tests that need a device are
in test_gpu_device.py.
"""

from __future__ import annotations

import subprocess

from distributed import Client, Scheduler, Worker
from distributed.sizeof import safe_sizeof

from dask_memory_exporter import names as n
from dask_memory_exporter.heartbeat import (
    GPU_GAUGES,
    WORKER_BREAKDOWN_APPROXIMATE,
    WORKER_GPU_MANAGED_BYTES,
    WORKER_GPU_MEMORY_LIMIT_BYTES,
    WORKER_GPU_MEMORY_TOTAL_BYTES,
    WORKER_GPU_MEMORY_USED_BYTES,
    WORKER_GPU_RMM_POOL_BYTES,
    WORKER_GPU_RMM_USED_BYTES,
    WORKER_GPU_UTILIZATION_RATIO,
)
from tests.support.gpu import DeviceBytes, GpuKeys, gpu_worker
from tests.support.live import Samples, by_worker_name, serve_exporter

GiB = 2**30
MiB = 2**20


def _gpu(samples: Samples) -> dict[str, dict[str, float]]:
    """{family: {worker_name: value}} of every GPU family."""
    return {g.metric: by_worker_name(samples, g.metric) for g in GPU_GAUGES}


async def test_gpu_series_exact_and_absent_for_a_cpu_worker() -> None:
    """A worker reporting the GPU keys gets each series with the exact value (utilization as
    a ratio, the RMM pool from its entry); a CPU worker gets none; values follow the worker."""
    keys = GpuKeys(used=9_790_000_000, total=150 * GiB, utilization=37.0, rmm=(3 * GiB, 8 * GiB))
    async with Scheduler(host="127.0.0.1", port=0, dashboard=False) as scheduler:
        address = scheduler.address
        async with (
            Worker(address, name="gpu", nthreads=1, host="127.0.0.1", metrics=keys.metrics()),
            Worker(address, name="cpu", nthreads=1, host="127.0.0.1"),
            serve_exporter(scheduler=address) as ex,
        ):
            s = await ex.wait_for(
                lambda s: (
                    by_worker_name(s, WORKER_GPU_MEMORY_USED_BYTES) == {"gpu": 9_790_000_000}
                    and "cpu" in by_worker_name(s, n.WORKER_PROCESS_BYTES)
                ),
                what="the GPU worker's device memory",
            )
            assert _gpu(s) == {
                WORKER_GPU_MEMORY_USED_BYTES: {"gpu": 9_790_000_000},
                WORKER_GPU_MEMORY_TOTAL_BYTES: {"gpu": 150 * GiB},
                WORKER_GPU_UTILIZATION_RATIO: {"gpu": 0.37},
                WORKER_GPU_RMM_USED_BYTES: {"gpu": 3 * GiB},
                WORKER_GPU_RMM_POOL_BYTES: {"gpu": 8 * GiB},
                # No preload: the host breakdown of a GPU worker is flagged approximate.
                WORKER_BREAKDOWN_APPROXIMATE: {"gpu": 1},
                # Neither is reported without the preload: no series, not zeros.
                WORKER_GPU_MEMORY_LIMIT_BYTES: {},
                WORKER_GPU_MANAGED_BYTES: {},
            }
            keys.used += 2 * GiB
            keys.utilization = 100.0
            s = await ex.wait_for(
                lambda s: (
                    by_worker_name(s, WORKER_GPU_MEMORY_USED_BYTES)
                    == {"gpu": 9_790_000_000 + 2 * GiB}
                ),
                what="device memory rising by 2 GiB",
            )
            assert by_worker_name(s, WORKER_GPU_UTILIZATION_RATIO) == {"gpu": 1.0}
            # The exposition with the GPU families passes Prometheus' own lint.
            _, _, body = await ex.get("/metrics")
            lint = subprocess.run(
                ["promtool", "check", "metrics"], input=body, capture_output=True, timeout=30
            )
            assert lint.returncode == 0, lint.stdout.decode() + lint.stderr.decode()


async def test_preload_reports_device_limit_and_corrects_managed() -> None:
    """With the preload, a DeviceHostFile-shaped store reports its device limit and the bytes
    of its device tier, and managed memory is the host part only (flag 0: exact)."""
    keys = GpuKeys(used=2 * GiB, total=16 * GiB, utilization=0.0)
    limit = 4 * GiB
    async with Scheduler(host="127.0.0.1", port=0, dashboard=False) as scheduler:
        address = scheduler.address
        async with (
            gpu_worker(address, keys, limit),
            Client(address, asynchronous=True) as client,
            serve_exporter(scheduler=address) as ex,
        ):
            on_device = DeviceBytes(b"d" * (8 * MiB))
            on_host = b"h" * (3 * MiB)
            futures = [
                client.submit(lambda: on_device, key="on-device", pure=False),
                client.submit(lambda: on_host, key="on-host", pure=False),
            ]
            await client.gather(futures)
            device_size, host_size = safe_sizeof(on_device), safe_sizeof(on_host)
            s = await ex.wait_for(
                lambda s: by_worker_name(s, WORKER_GPU_MANAGED_BYTES) == {"gpu": device_size},
                what="the device tier's bytes",
            )
            assert by_worker_name(s, WORKER_GPU_MEMORY_LIMIT_BYTES) == {"gpu": limit}
            assert by_worker_name(s, WORKER_BREAKDOWN_APPROXIMATE) == {"gpu": 0}
            # The worker's managed_bytes counts both keys; the exporter's managed only the
            # host one (the device key is not in the worker's RSS on a real GPU).
            assert by_worker_name(s, n.WORKER_MANAGED_BYTES) == {"gpu": host_size}
            del futures
