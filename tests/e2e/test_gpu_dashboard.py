"""The GPU rows of both dashboards, live: every query returns the GPU worker's figures.

A real scheduler with a GPU-keyed worker (its heartbeat carries the keys a worker with pynvml
and rmm sends, with values the test sets: there is no GPU here, tests/support/gpu.py), the
dask_memory_exporter.gpu preload on a DeviceHostFile-shaped store, and a CPU worker; the
exporter scraped every second by a real Prometheus. Every query of the GPU rows and the
hidden ``gpu`` variable is run as Grafana would: none may fail, none may be empty except the
sidecar-only per-process series, and each returns the GPU worker only. The demo's dashboard test
(test_dashboard_queries.py) runs the same queries on a cluster without a GPU, where they are
empty, as they should be.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from distributed import Scheduler, Worker

from dask_memory_exporter.dashboards import render_files
from dask_memory_exporter.gpu_nvml import WORKER_GPU_PROCESS_MEMORY_BYTES
from dask_memory_exporter.heartbeat import WORKER_GPU_MEMORY_USED_BYTES
from dask_memory_exporter.mixin import MixinConfig
from tests.e2e.test_dashboard_queries import gpu_row_queries, run
from tests.support.gpu import GpuKeys, gpu_worker
from tests.support.live import serve_exporter
from tests.support.promstack import run_prometheus

GiB = 2**30


@pytest.mark.timeout(120)
async def test_gpu_row_queries_return_the_gpu_worker() -> None:
    config = MixinConfig()
    keys = GpuKeys(used=5 * GiB, total=16 * GiB, utilization=40.0, rmm=(2 * GiB, 4 * GiB))
    async with Scheduler(host="127.0.0.1", port=0, dashboard=False) as scheduler:
        address = scheduler.address
        async with (
            gpu_worker(address, keys, 8 * GiB),
            Worker(address, name="cpu", nthreads=1, host="127.0.0.1"),
            serve_exporter(scheduler=address) as ex,
        ):
            # Prometheus is driven with blocking calls: in threads, so the exporter (on this
            # event loop) keeps answering its scrapes.
            with run_prometheus(scrape_targets=[ex.url.removeprefix("http://")]) as prom:
                await asyncio.to_thread(
                    prom.wait_for, f"{WORKER_GPU_MEMORY_USED_BYTES}{config.selector()}", 60
                )
                at = await asyncio.to_thread(lambda: prom.query("time()")[0].value)
                values = {
                    "__rate_interval": "4s",
                    "__interval": "1s",
                    "__range": "5m",
                    "datasource": "",
                    "namespace": ".*",
                    "job": ".*",
                    "instance": ".*",
                    "cluster": ".*",  # the gateway mode's label; All here (no gateway)
                }
                failures = []
                count = 0
                for file, text in render_files(config).items():
                    for q in gpu_row_queries(json.loads(text), file):
                        count += 1
                        worker = ".*" if "cluster" in file else "gpu"
                        subst = {**values, "worker": worker}
                        try:
                            result = await asyncio.to_thread(run, prom, q, subst, at)
                        except AssertionError as e:
                            failures.append(f"{file} / {q.title} / {q.ref}: {e}")
                            continue
                        if WORKER_GPU_PROCESS_MEMORY_BYTES in q.expr:
                            continue  # sidecar-only (NVML): empty in scheduler mode
                        names = {s.labels.get("worker_name") for s in result}
                        ok = bool(result) if q.title.startswith("variable") else names == {"gpu"}
                        if not ok:
                            failures.append(f"{file} / {q.title} / {q.ref}: {names}")
                assert count >= 10
                assert not failures, "\n".join(failures)
