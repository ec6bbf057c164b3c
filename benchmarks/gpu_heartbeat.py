"""Cost of the GPU heartbeat gauges: decoding a poll with and without GPU keys.

Each poll reads every declared heartbeat gauge of every worker (``heartbeat.read_heartbeat``).
The GPU gauges must cost next to nothing on CPU workers, where their keys are absent, and little
on GPU workers. This measures ``read_heartbeat`` per worker and ``decode_identity`` of 1,000
workers (the scheduler source's whole decode), on a CPU-worker entry and on one that carries
the keys a GPU worker with rmm and the dask_memory_exporter.gpu preload sends.

    .venv/bin/python -m benchmarks.gpu_heartbeat

Prints a Markdown table (docs/gpu.md records it). Minimum of 7 repeats: the machine is shared,
and the minimum is the least disturbed figure. Not a test: nothing here asserts a time.
"""

from __future__ import annotations

import copy
import timeit
from typing import Any

from dask_memory_exporter.gpu import GPU_KEY
from dask_memory_exporter.heartbeat import read_heartbeat
from dask_memory_exporter.scheduler import decode_identity

MiB = 2**20
CPU: dict[str, Any] = {
    "memory": 100 * MiB,
    "managed_bytes": 10 * MiB,
    "spilled_bytes": {"memory": 0, "disk": 0},
    "task_counts": {"executing": 1, "memory": 20},
    "cpu": 1.0,
    "event_loop_interval": 0.02,
}
GPU: dict[str, Any] = {
    **CPU,
    "gpu_memory_used": 9_790_000_000,
    "gpu-memory-total": 150 * 2**30,
    "gpu_utilization": 37,
    "rmm": {"rmm-used": 2**30, "rmm-total": 8 * 2**30},
    GPU_KEY: {"storage": "DeviceHostFile", "device-memory-limit": 2**34,
              "device-bytes": 2**30, "exact": True},
}  # fmt: skip


def best(fn: Any, number: int) -> float:
    """Seconds per call: the minimum over 7 repeats."""
    return min(timeit.repeat(fn, number=number, repeat=7)) / number


def identity(metrics: dict[str, Any], n: int) -> dict[str, Any]:
    entry = {"host": "10.0.0.1", "name": "w", "nthreads": 1, "memory_limit": 2**32,
             "last_seen": 1.0, "status": "running", "metrics": metrics}  # fmt: skip
    workers = {f"tcp://10.0.{i // 250}.{i % 250}:4000": copy.deepcopy(entry) for i in range(n)}
    return {"address": "tcp://s:8786", "workers": workers}


def main() -> None:
    print("| worker entry | read_heartbeat per worker µs | decode_identity of 1,000 workers ms |")
    print("|---|---|---|")
    for label, metrics in (("CPU worker", CPU), ("GPU worker (rmm, preload)", GPU)):
        per = best(lambda m=metrics: read_heartbeat(m), 20_000) * 1e6
        ident = identity(metrics, 1000)
        poll = best(lambda i=ident: decode_identity(i), 20) * 1e3
        print(f"| {label} | {per:.2f} | {poll:.1f} |")


if __name__ == "__main__":
    main()
