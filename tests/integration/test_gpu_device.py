"""On a machine with an NVIDIA GPU: a real nanny worker's device memory, and a CuPy allocation.

Marked ``gpu`` and skipped, with the reason, where NVML finds no device (CI has none); the
same figures without a device are tested in test_gpu.py. On a GPU machine these need CuPy
(``pip install cupy-cuda12x``) and, for the dask-cuda case, dask-cuda: a missing one fails with
a message rather than skipping, so a GPU run cannot pass without testing.
"""

from __future__ import annotations

import importlib

import pytest
from distributed import Client, Nanny, Scheduler

from dask_memory_exporter.heartbeat import (
    WORKER_GPU_MEMORY_TOTAL_BYTES,
    WORKER_GPU_MEMORY_USED_BYTES,
)
from tests.support.live import by_worker_name, serve_exporter


def _devices() -> int:
    try:
        pynvml = importlib.import_module("pynvml")
        pynvml.nvmlInit()
        return int(pynvml.nvmlDeviceGetCount())
    except Exception:
        return 0


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(_devices() == 0, reason="no NVIDIA GPU: NVML finds no device"),
]

ALLOCATION = 2**30


def _require(module: str, hint: str) -> None:
    try:
        importlib.import_module(module)
    except ImportError:
        pytest.fail(f"a GPU is present but {module} is not installed: {hint}")


def _allocate(n: int) -> int:
    """On the worker: hold ``n`` bytes of device memory (released with the worker)."""
    import cupy
    from distributed import get_worker

    worker = get_worker()
    held = worker.__dict__.setdefault("_gpu_test_arrays", [])
    held.append(cupy.ones(n, dtype=cupy.uint8))
    cupy.cuda.runtime.deviceSynchronize()
    return n


def _context() -> int:
    """On the worker: create its CUDA context (a few hundred MiB) before the baseline."""
    return _allocate(1)


async def test_nanny_worker_device_memory_rises_by_a_cupy_allocation() -> None:
    _require("cupy", "pip install cupy-cuda12x")
    async with Scheduler(host="127.0.0.1", port=0, dashboard=False) as scheduler:
        address = scheduler.address
        async with (
            Nanny(address, name="gpu", nthreads=1, host="127.0.0.1"),
            Client(address, asynchronous=True) as client,
            serve_exporter(scheduler=address) as ex,
        ):
            await client.submit(_context, pure=False)
            s = await ex.wait_for(
                lambda s: "gpu" in by_worker_name(s, WORKER_GPU_MEMORY_USED_BYTES),
                timeout=60,
                what="device memory of the nanny's worker",
            )
            assert by_worker_name(s, WORKER_GPU_MEMORY_TOTAL_BYTES)["gpu"] > ALLOCATION
            before = by_worker_name(s, WORKER_GPU_MEMORY_USED_BYTES)["gpu"]
            await client.submit(_allocate, ALLOCATION, pure=False)
            # The whole device is measured: other processes may add, never take away ours.
            await ex.wait_for(
                lambda s: (
                    by_worker_name(s, WORKER_GPU_MEMORY_USED_BYTES).get("gpu", 0)
                    >= before + ALLOCATION
                ),
                timeout=60,
                what=f"device memory rising by {ALLOCATION} bytes",
            )


async def test_dask_cuda_worker_reports_its_device_limit() -> None:
    _require("dask_cuda", "pip install dask-cuda")
    _require("cupy", "pip install cupy-cuda12x")
    from dask_cuda import LocalCUDACluster

    from dask_memory_exporter.heartbeat import (
        WORKER_BREAKDOWN_APPROXIMATE,
        WORKER_GPU_MANAGED_BYTES,
        WORKER_GPU_MEMORY_LIMIT_BYTES,
    )

    limit = 2 * ALLOCATION
    async with (
        LocalCUDACluster(
            n_workers=1,
            host="127.0.0.1",
            scheduler_port=0,
            dashboard_address="127.0.0.1:0",
            device_memory_limit=limit,
            memory_limit="4GiB",
            preload=["dask_memory_exporter.gpu"],
            asynchronous=True,
        ) as cluster,
        Client(cluster, asynchronous=True) as client,
        serve_exporter(scheduler=cluster.scheduler_address) as ex,
    ):
        import cupy

        future = client.submit(lambda: cupy.ones(ALLOCATION, dtype=cupy.uint8), pure=False)
        await future
        s = await ex.wait_for(
            lambda s: list(by_worker_name(s, WORKER_GPU_MANAGED_BYTES).values()) == [ALLOCATION],
            timeout=60,
            what="the CuPy array in dask-cuda's device tier",
        )
        assert list(by_worker_name(s, WORKER_GPU_MEMORY_LIMIT_BYTES).values()) == [limit]
        assert list(by_worker_name(s, WORKER_BREAKDOWN_APPROXIMATE).values()) == [0]
        del future
