"""How long the preload holds the scheduler's event loop, per heartbeat interval.

Run: ``.venv/bin/python -m benchmarks.preload_cost [--workers 1000] [--intervals 5]
[--scrape-interval 1] [--write-docs]``. Not a test: nothing here asserts a time.

A real ``distributed.Scheduler`` runs in this process with ``--workers`` in-process
``WorkerState`` objects (no worker processes: the machine has two cores). Each worker
"heartbeats" once per heartbeat interval at its own phase through the scheduler's real
``heartbeat_worker`` handler, with a process memory that moves, so every poll sees new
figures. The exporter is started exactly as the preload starts it (``dask_setup``), and another
process scrapes ``/metrics`` (OpenMetrics, gzip) every ``--scrape-interval`` seconds, as a
Prometheus would, only more often.

What counts as the exporter holding the loop: every callback the event loop runs in the
exporter's context. The exporter is started in a context carrying a marker; every task,
server socket and connection it creates inherits it, and ``asyncio.Handle._run`` is wrapped
to time the callbacks that carry the marker. That is the poll (copying the workers' state,
building the snapshot), the hand-over to and from the render thread, and the HTTP handling
of scrapes. Building the values from the capture, building the Snapshot and rendering run in
threads; their CPU time is reported beside, as an upper bound of the GIL time they can take
from the loop. The scheduler's own heartbeat handling is timed the same way, for scale.

``--write-docs`` replaces the measured section of docs/hpc.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import datetime
import os
import platform
import random
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import dask.config
from distributed import Scheduler
from distributed.core import Status
from distributed.scheduler import WorkerState, heartbeat_interval

from dask_memory_exporter import collector, preload, scheduler_state, snapshot
from dask_memory_exporter.app import STATE

MiB = 2**20
EXPORTER: contextvars.ContextVar[str] = contextvars.ContextVar("bench_owner", default="")
DOCS = Path(__file__).resolve().parent.parent / "docs" / "hpc.md"
BEGIN = "<!-- preload_cost: begin -->"
END = "<!-- preload_cost: end -->"


@dataclass
class Holds:
    """Callback durations on the loop, by owner."""

    times: dict[str, list[float]] = field(
        default_factory=lambda: {"exporter": [], "heartbeats": []}
    )
    recording: bool = False

    def install(self) -> Callable[[], None]:
        original = asyncio.events.Handle._run

        def timed(handle: asyncio.events.Handle) -> None:
            owner = handle._context.get(EXPORTER) if self.recording else ""  # type: ignore[attr-defined]
            if not owner:
                original(handle)
                return
            start = time.perf_counter()
            original(handle)
            self.times[owner].append(time.perf_counter() - start)

        asyncio.events.Handle._run = timed  # type: ignore[method-assign,assignment]

        def restore() -> None:
            asyncio.events.Handle._run = original  # type: ignore[method-assign]

        return restore


@dataclass
class ThreadTimes:
    """CPU time of the exporter's work in threads: building the values from the capture,
    building the Snapshot, rendering the exposition."""

    cpu: dict[str, list[float]] = field(default_factory=dict)
    recording: bool = False

    def install(self) -> Callable[[], None]:
        targets: list[tuple[Any, str]] = [
            (scheduler_state, "_result"),
            (snapshot.Poller, "_build"),
            (collector.Exposition, "render"),
        ]
        originals = [(owner, name, owner.__dict__[name]) for owner, name in targets]
        for owner, name, original in originals:
            setattr(owner, name, self._timed(name, original))

        def restore() -> None:
            for owner, name, original in originals:
                setattr(owner, name, original)

        return restore

    def _timed(self, name: str, original: Any) -> Any:
        fn = original.__func__ if isinstance(original, classmethod | staticmethod) else original

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                if self.recording:
                    self.cpu.setdefault(name, []).append(time.thread_time() - start)

        if isinstance(original, classmethod):
            return classmethod(timed)
        if isinstance(original, staticmethod):
            return staticmethod(timed)
        return timed

    def total(self) -> float:
        return sum(sum(v) for v in self.cpu.values())


def add_workers(scheduler: Scheduler, n: int) -> list[str]:
    """``n`` WorkerStates registered in the scheduler's state (no comm, no process)."""
    addresses = []
    for i in range(n):
        address = f"tcp://10.{i // 250}.{i % 250}.1:40001"
        ws = WorkerState(
            address=address,
            status=Status.running,
            pid=10_000 + i,
            name=f"worker-{i}",
            nthreads=4,
            memory_limit=8 * 1024 * MiB,
            local_directory="/tmp",
            nanny=f"tcp://10.{i // 250}.{i % 250}.1:40002",
            server_id=f"bench-{i}",
            scheduler=scheduler,
        )
        ws.nbytes = random.randint(0, 2048) * MiB
        scheduler.workers[address] = ws
        scheduler.running.add(ws)
        addresses.append(address)
    return addresses


def heartbeat_metrics(ws: WorkerState) -> dict[str, Any]:
    process = ws.nbytes + random.randint(300, 900) * MiB
    return {
        "memory": process,
        "managed_bytes": ws.nbytes,
        "spilled_bytes": {"memory": 0, "disk": random.choice((0, 0, 0, 64 * MiB))},
        "task_counts": {"executing": random.randint(0, 4), "memory": 100},
        "bandwidth": {"total": 100e6, "workers": {}, "types": {}},
        "digests_total_since_heartbeat": {},
        "cpu": 50.0,
        "time": time.time(),
    }


async def heartbeats(scheduler: Scheduler, addresses: list[str], stop: asyncio.Event) -> None:
    """Each worker heartbeats once per interval, at its own phase, through the real handler."""
    interval = float(heartbeat_interval(len(addresses)))
    start = time.monotonic()
    phase = {a: i * interval / len(addresses) for i, a in enumerate(addresses)}
    next_beat = dict(phase)
    while not stop.is_set():
        elapsed = time.monotonic() - start
        for a in addresses:
            if next_beat[a] <= elapsed:
                ws = scheduler.workers[a]
                scheduler.heartbeat_worker(
                    address=a, resolve_address=False, metrics=heartbeat_metrics(ws)
                )
                next_beat[a] += interval
        await asyncio.sleep(0.02)


SCRAPER = """
import sys, time, urllib.request
url, every, duration = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
headers = {
    "Accept": "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
    "Accept-Encoding": "gzip",
}
end, n = time.monotonic() + duration, 0
while time.monotonic() + every < end:
    time.sleep(every)
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as r:
        r.read()
    n += 1
print(n)
"""
"""Prometheus' request (OpenMetrics preferred, gzip accepted), from another process as
Prometheus would be: a scraper thread in this process would take the GIL from the loop."""


async def measure(workers: int, intervals: int, scrape_every: float) -> dict[str, Any]:
    holds, renders = Holds(), ThreadTimes()
    restore = [holds.install(), renders.install()]
    try:
        # The active memory manager would act on workers that have no process behind them.
        with dask.config.set({"distributed.scheduler.active-memory-manager.start": False}):
            scheduler = await Scheduler(host="127.0.0.1", port=0, dashboard_address="127.0.0.1:0")
        try:
            return await _run(scheduler, holds, renders, workers, intervals, scrape_every)
        finally:
            await preload.dask_teardown(scheduler)
            await scheduler.close()
    finally:
        for r in restore:
            r()


async def _run(
    scheduler: Scheduler,
    holds: Holds,
    renders: ThreadTimes,
    workers: int,
    intervals: int,
    scrape_every: float,
) -> dict[str, Any]:
    addresses = add_workers(scheduler, workers)
    interval = float(heartbeat_interval(workers))
    stop = asyncio.Event()
    hb_ctx = contextvars.copy_context()
    hb_ctx.run(EXPORTER.set, "heartbeats")
    beats = asyncio.create_task(heartbeats(scheduler, addresses, stop), context=hb_ctx)
    await asyncio.sleep(interval)  # every worker has heartbeated once

    ex_ctx = contextvars.copy_context()
    ex_ctx.run(EXPORTER.set, "exporter")
    setup = preload.dask_setup.callback(
        scheduler, memory_exporter_port=0, memory_exporter_host="127.0.0.1"
    )
    await asyncio.create_task(setup, context=ex_ctx)
    exporter = preload.running(scheduler)
    assert exporter is not None and exporter.server.app is not None
    state = exporter.server.app[STATE]
    while state.snapshot.polls_total < 2:  # warm up: first polls, first render
        await asyncio.sleep(0.1)

    polls0 = state.snapshot.polls_total
    duration = intervals * interval
    scraper = await asyncio.create_subprocess_exec(
        sys.executable, "-c", SCRAPER, f"{exporter.url}/metrics", str(scrape_every),
        str(duration), stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    holds.recording = renders.recording = True
    started = time.perf_counter()
    await asyncio.sleep(duration)
    holds.recording = renders.recording = False
    window = time.perf_counter() - started
    out, _ = await scraper.communicate()
    scrapes = int(out.decode().strip() or 0)
    polls = state.snapshot.polls_total - polls0
    stop.set()
    await beats
    assert len(state.snapshot.workers) == workers

    ex, hb = holds.times["exporter"], holds.times["heartbeats"]
    return {
        "workers": workers,
        "interval": interval,
        "window": window,
        "polls": polls,
        "scrapes": scrapes,
        "held": sum(ex),
        "callbacks": len(ex),
        "longest": max(ex, default=0.0),
        "ratio": sum(ex) / window,
        "thread_cpu": renders.total(),
        "render_cpu": sum(renders.cpu.get("render", [])),
        "heartbeats_held": sum(hb),
    }


def table(results: list[dict[str, Any]]) -> str:
    head = (
        "| workers | heartbeat interval | window | polls | scrapes | exporter on the loop, "
        "per interval | share of the loop | longest single hold | threads' CPU per interval "
        "(rendering) | loop + threads, share | the scheduler's own heartbeat handling, per "
        "interval |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|"
    )
    rows = []
    for r in results:
        per = r["interval"] / r["window"]
        rows.append(
            f"| {r['workers']:,} | {r['interval']:g} s | {r['window']:.0f} s | {r['polls']} | "
            f"{r['scrapes']} | {r['held'] * per * 1000:.1f} ms | {r['ratio']:.2%} | "
            f"{r['longest'] * 1000:.1f} ms | {r['thread_cpu'] * per * 1000:.1f} ms "
            f"({r['render_cpu'] * per * 1000:.1f} ms) | "
            f"{(r['held'] + r['thread_cpu']) / r['window']:.2%} | "
            f"{r['heartbeats_held'] * per * 1000:.1f} ms |"
        )
    return "\n".join([head, *rows])


def environment() -> str:
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (
        f"{datetime.date.today().isoformat()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, distributed {version('distributed')}, load average "
        f"{load} (other jobs share the cores)"
    )


def write_docs(text: str) -> None:
    doc = DOCS.read_text()
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    if not pattern.search(doc):
        raise SystemExit(f"{DOCS}: markers {BEGIN} … {END} not found")
    DOCS.write_text(pattern.sub(lambda _: f"{BEGIN}\n{text}\n{END}", doc))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1000])
    parser.add_argument("--intervals", type=int, default=5, help="heartbeat intervals measured")
    parser.add_argument("--scrape-interval", type=float, default=1.0, help="seconds")
    parser.add_argument("--write-docs", action="store_true", help="update docs/hpc.md")
    args = parser.parse_args(argv)
    results = [asyncio.run(measure(n, args.intervals, args.scrape_interval)) for n in args.workers]
    text = (
        f"Measured with `benchmarks/preload_cost.py` on {environment()}; a scrape every "
        f"{args.scrape_interval:g} s.\n\n{table(results)}"
    )
    print(text)
    if args.write_docs:
        write_docs(text)


if __name__ == "__main__":
    main()
