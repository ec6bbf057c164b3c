"""Benchmark of the events source's cost per poll, on a real scheduler's event log.

Run: ``.venv/bin/python -m benchmarks.events_bench`` (about half a minute). It prints a
Markdown table; docs/performance.md records the results. Not a test: nothing here asserts a
time.

A real ``Scheduler`` runs in this process with no worker; its event log is filled through its
own ``log_event`` with events shaped as distributed 2026.8 logs them. For each case:

- round trip: one ``EventsSource.fetch`` over a real TCP comm (identity plus the topics it
  reads), median of many polls; the scheduler runs in the same process and event loop, so this
  is exporter and scheduler work together;
- scheduler side: the handlers (``identity(n_workers=0)``, ``get_events``) plus serialising
  their answers, which is what each poll costs the scheduler;
- payload: bytes of the answers on the wire (``distributed.protocol.dumps`` frames).
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import psutil
from distributed import Scheduler
from distributed.protocol.core import dumps
from distributed.security import Security

from dask_memory_exporter.events import MAX_TOPICS_PER_POLL, RESTART_TOPIC, EventsSource
from dask_memory_exporter.memory import WorkerReading
from dask_memory_exporter.source import WorkerInfo

MiB = 2**20


def median_ms(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def roster(n: int, prefix: str = "10.0.0") -> dict[str, WorkerInfo]:
    out = {}
    for i in range(n):
        addr = f"tcp://{prefix}.{i % 250}:{40000 + i}"
        out[addr] = WorkerInfo(
            address=addr,
            name=f"worker-{i}",
            host=f"{prefix}.{i % 250}",
            nthreads=1,
            memory_limit=4 * 1024 * MiB,
            status="running",
            last_seen=0.0,
            nanny=None,
            reading=WorkerReading(100 * MiB, 0, 0, 0, 0.0),
        )
    return out


def remove_worker_event(lost: int) -> dict[str, Any]:
    return {
        "action": "remove-worker",
        "processing-tasks": {f"('task-{i:040x}', {i})" for i in range(2)},
        "lost-computed-tasks": {f"('chunk-{i:040x}', {i})" for i in range(lost)},
        "lost-scattered-tasks": set(),
        "stimulus_id": f"handle-worker-cleanup-{time.time()}",
        "expected": False,
    }


def payload(msg: Any) -> int:
    return sum(len(f) for f in dumps(msg))


async def polls_ms(source: EventsSource, workers: dict[str, WorkerInfo], n: int) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        await source.fetch(workers)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


async def main() -> None:
    logging.getLogger("dask_memory_exporter").setLevel(logging.ERROR)  # the full-log warning
    print(f"machine: {psutil.cpu_count()} cores, Python {sys.version.split()[0]}\n")
    print("| case | round trip per poll ms | scheduler side per poll ms | payload per poll KiB |")
    print("|---|---|---|---|")
    async with Scheduler(port=0, dashboard_address=":0", validate=False) as sched:
        addr = sched.address
        workers = roster(100)

        def steady_cost() -> tuple[float, int]:
            ident = median_ms(lambda: dumps(sched.identity(n_workers=0)), 200)
            topic = median_ms(lambda: dumps(sched.get_events(RESTART_TOPIC)), 200)
            size = payload(sched.identity(n_workers=0)) + payload(sched.get_events(RESTART_TOPIC))
            return ident + topic, size

        source = EventsSource(addr, Security(), 10)
        await source.fetch(workers)
        rt = await polls_ms(source, workers, 200)
        side, size = steady_cost()
        row("no memory restart logged (the usual case)", rt, side, size)

        for i in range(1000):  # a full log: distributed.admin.low-level-log-length
            sched.log_event(
                RESTART_TOPIC,
                {
                    "worker": f"tcp://10.0.1.{i % 250}:{41000 + i}",
                    "pid": 1000 + i,
                    "rss": 4 * 1024 * MiB,
                },
            )
        rt = await polls_ms(source, workers, 100)
        side, size = steady_cost()
        row("full memory-restart log (1,000 events)", rt, side, size)
        await source.close()

        # Departures: each departed worker's topic is read once, on top of the steady poll.
        sched._broker.truncate(RESTART_TOPIC)
        for lost in (10, 1000):
            for k in (1, MAX_TOPICS_PER_POLL):
                many = roster(k + 1, prefix=f"10.{k}.{lost % 250}")
                src = EventsSource(addr, Security(), 10)
                await src.fetch(many)
                gone = list(many)[:k]
                for a in gone:
                    sched.log_event(a, {"action": "add-worker"})
                    sched.log_event(a, remove_worker_event(lost))
                left = {a: w for a, w in many.items() if a not in gone}
                t = time.perf_counter()
                await src.fetch(left)
                rt = (time.perf_counter() - t) * 1000
                await src.close()
                side, size = steady_cost()
                side += sum(topic_ms(sched, a) for a in gone)
                size += sum(payload(sched.get_events(a)) for a in gone)
                row(f"{k} departed, {lost:,} computed tasks lost each", rt, side, size)
                for a in gone:
                    sched._broker.truncate(a)


def topic_ms(sched: Scheduler, topic: str) -> float:
    return median_ms(lambda: dumps(sched.get_events(topic)), 20)


def row(case: str, rt: float, side: float, size: int) -> None:
    print(f"| {case} | {rt:.2f} | {side:.3f} | {size / 1024:.1f} |")


if __name__ == "__main__":
    asyncio.run(main())
