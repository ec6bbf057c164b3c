"""Benchmark: the direct per-worker writer against prometheus_client's own exposition.

The exporter writes its per-worker families with ``write_worker_families`` instead of going
through prometheus_client's ``generate_latest``; this measures what that buys, at 1,000 and
5,000 workers, in both exposition formats. The reference is ``generate_latest`` (text) and the
OpenMetrics ``generate_latest`` over ``SnapshotCollector(snapshot)`` in a fresh
``CollectorRegistry(auto_describe=False)``, exactly as a registry-based exporter would serve it.
The direct writer's output is valid in both formats, so one call serves both.

Run: ``.venv/bin/python -m benchmarks.render_bench`` (about half a minute; ``--repeat`` and
``--workers`` to change it). It prints a Markdown table of median CPU times (process time, so
that other jobs on a shared machine inflate them less than wall-clock time);
docs/performance.md records the results. Not a test: nothing here asserts a time.

Only public names of the package are used, so that the benchmark survives a refactor.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence
from functools import partial

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

from dask_memory_exporter.collector import SnapshotCollector, write_worker_families
from dask_memory_exporter.memory import MemoryBreakdown, WorkerReading
from dask_memory_exporter.scheduler import WorkerInfo
from dask_memory_exporter.snapshot import Snapshot, WorkerSnapshot

MiB = 2**20
NOW = 1_800_000_000.0
THRESHOLDS = {"target": 0.6, "spill": 0.7, "pause": 0.8, "terminate": 0.95}


def make_worker(i: int) -> WorkerSnapshot:
    """Worker ``i``: its own address, name and memory figures, as on a real cluster."""
    address = f"tcp://10.{i // 60000}.{(i // 250) % 240}.{i % 250}:{40000 + i % 20000}"
    process = (500 + (i * 37) % 3000) * MiB + i
    managed = ((i * 13) % 1500) * MiB + 7 * i
    spilled = ((i * 29) % 900) * MiB
    reading = WorkerReading(
        process=process,
        managed_total=managed + spilled,
        spilled_memory=spilled,
        spilled_disk=spilled + i,
        heartbeat_time=NOW - (i % 50) / 10,
    )
    info = WorkerInfo(
        address=address,
        name=f"dask-worker-{i:05d}",
        host=address.split("//")[1].rsplit(":", 1)[0],
        nthreads=4,
        memory_limit=(4096 + 512 * (i % 5)) * MiB,
        status="paused" if i % 97 == 0 else "running",
        last_seen=reading.heartbeat_time,
        nanny=None,
        reading=reading,
    )
    memory = MemoryBreakdown(
        process=process,
        managed=managed,
        unmanaged_old=(process - managed) * 3 // 4,
        spilled=spilled + i,
    )
    return WorkerSnapshot(info=info, memory=memory)


def make_snapshot(n_workers: int) -> Snapshot:
    return Snapshot(
        time=NOW,
        workers=tuple(make_worker(i) for i in range(n_workers)),
        thresholds=THRESHOLDS,
        scheduler_up=True,
        scheduler_workers=n_workers,
        polled=True,
        poll_duration=0.01,
        last_success=NOW,
        polls_total=100,
    )


def reference(snapshot: Snapshot, openmetrics: bool) -> bytes:
    """prometheus_client's own exposition of the whole collector (workers included)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(snapshot, workers=True))
    text: bytes = generate_openmetrics(registry) if openmetrics else generate_latest(registry)
    return text


def direct(snapshot: Snapshot) -> bytes:
    text: str = write_worker_families(snapshot)
    return text.encode()


def cpu_ms(fn: Callable[[], object]) -> float:
    """CPU time of one call: on a shared machine, waiting for a core does not count."""
    t = time.process_time()
    fn()
    return (time.process_time() - t) * 1000


def samples(text: bytes) -> int:
    return sum(1 for line in text.splitlines() if line and not line.startswith(b"#"))


def bench(n_workers: int, repeat: int) -> list[str]:
    """Table rows for one cluster size: text, OpenMetrics, and both formats of one poll.

    The three renderings take turns in each round, so that a burst of load on the machine
    hits all of them rather than one; each figure is the median over the rounds.
    """
    snap = make_snapshot(n_workers)
    worker_samples = samples(direct(snap))
    runs: dict[str, list[float]] = {"direct": [], "text": [], "openmetrics": []}
    for _ in range(repeat):
        runs["direct"].append(cpu_ms(partial(direct, snap)))
        runs["text"].append(cpu_ms(partial(reference, snap, False)))
        runs["openmetrics"].append(cpu_ms(partial(reference, snap, True)))
    mine = statistics.median(runs["direct"])
    text, om = statistics.median(runs["text"]), statistics.median(runs["openmetrics"])
    rows = []
    for label, ref in (
        ("text", text),
        ("OpenMetrics", om),
        # The direct output serves both formats; prometheus_client renders each one.
        ("both (one poll)", text + om),
    ):
        rows.append(
            f"| {n_workers:,} | {worker_samples:,} | {label} | {ref:.0f} ms | {mine:.1f} ms "
            f"| {ref / mine:.0f}x |"
        )
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--workers", type=int, nargs="+", default=[1000, 5000])
    parser.add_argument("--repeat", type=int, default=7, help="repetitions (median is shown)")
    args = parser.parse_args(argv)
    print(
        "| workers | worker samples | format | prometheus_client generate_latest (CPU) "
        "| write_worker_families (CPU) | speed-up |"
    )
    print("|---|---|---|---|---|---|")
    for n_workers in args.workers:
        for row in bench(n_workers, args.repeat):
            print(row, flush=True)


if __name__ == "__main__":
    main()
