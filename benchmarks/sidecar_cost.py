"""Worker sidecars' cost to the scheduler: its CPU per heartbeat interval by sidecar count.

Run: ``.venv/bin/python -m benchmarks.sidecar_cost`` (about two minutes). Not a test.

The scheduler is a real ``distributed`` Scheduler in its own process (so its CPU can be read
with psutil), with one real in-process worker and ``--workers`` - 1 lightweight fakes: copies of
the real worker's ``WorkerState`` (its heartbeat ``metrics`` included) added to the scheduler's
worker table. The fakes send no heartbeats: their cost to the scheduler is the same with or
without sidecars, and what is measured is the CPU the sidecars add (the difference with a run
without any). The ``identity`` handler, its serialisation and the comm are the real ones.

Simulated sidecars, in this process:

- **old design** (``--mode local`` before this change): each sidecar polled the scheduler's
  ``identity`` for the whole cluster once per heartbeat interval, with the exporter's own
  ``SchedulerSource`` (one comm kept open per sidecar, as in production), staggered over the
  interval. Measured at a few counts and reported per sidecar, because the sidecars' own
  decoding of 1,000 workers each does not fit hundreds of them on a small machine.
- **new design**: the Pollers ``make_poller`` builds for ``--mode local --scheduler ADDRESS``,
  1,000 of them, each polling at its own pace; only their process-table read is replaced by a
  single ``statm`` read of this process (1,000 real /proc scans would measure this machine, not
  the scheduler). The scheduler's TCP connections are counted too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import os
import platform
import subprocess
import sys
import time
import uuid
from datetime import datetime, timezone
from typing import Any

import psutil
from distributed import LocalCluster
from distributed.scheduler import WorkerState, heartbeat_interval
from distributed.security import Security

from dask_memory_exporter.app import ExporterState, make_poller
from dask_memory_exporter.config import load_settings
from dask_memory_exporter.probe import SidecarSource
from dask_memory_exporter.process import LocalProcess, LocalReading
from dask_memory_exporter.scheduler import SchedulerSource

MiB = 2**20


# --- the scheduler process ----------------------------------------------------------------------
async def serve(n: int) -> None:
    """Run a scheduler with one real worker and n - 1 fakes; print its address; run forever."""
    async with LocalCluster(
        n_workers=1, processes=False, threads_per_worker=1, host="127.0.0.1",
        scheduler_port=0, dashboard_address="127.0.0.1:0", asynchronous=True, protocol="tcp",
    ) as cluster:  # fmt: skip
        scheduler = cluster.scheduler
        await asyncio.sleep(1.5)  # a few heartbeats: the real worker's metrics are filled
        real = next(iter(scheduler.workers.values()))
        for i in range(n - 1):
            addr = f"tcp://10.{i // 60000}.{(i // 250) % 240}.{i % 250}:{40000 + i % 20000}"
            ws = WorkerState(
                address=addr, status=real.status, pid=1000 + i, name=f"fake-{i}",
                nthreads=real.nthreads, memory_limit=real.memory_limit,
                local_directory=real.local_directory, nanny=None,
                server_id=uuid.uuid4().hex, services=dict(real.services),
                versions=real.versions, extra={}, scheduler=scheduler,
            )  # fmt: skip
            ws.metrics = copy.deepcopy(real.metrics)
            ws.last_seen = real.last_seen
            scheduler.workers[addr] = ws
        print(scheduler.address, flush=True)
        while True:
            await asyncio.sleep(3600)


# --- the measuring side -------------------------------------------------------------------------
def _cpu(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


async def _old_sidecar(address: str, interval: float, offset: float, stop: asyncio.Event) -> int:
    source = SchedulerSource(address, Security(), timeout=30)
    polls = 0
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(stop.wait(), offset)
    try:
        while not stop.is_set():
            started = time.monotonic()
            await source.fetch_identity()
            polls += 1
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(
                    stop.wait(), max(0.0, interval - (time.monotonic() - started))
                )
    finally:
        await source.close()
    return polls


async def measure_old(
    address: str, sched: psutil.Process, k: int, interval: float, seconds: float
) -> dict[str, float]:
    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(_old_sidecar(address, interval, interval * i / max(k, 1), stop))
        for i in range(k)
    ]
    await asyncio.sleep(interval)  # every sidecar connected and polling: steady state
    cpu0, t0 = _cpu(sched), time.monotonic()
    await asyncio.sleep(seconds)
    cpu1, t1 = _cpu(sched), time.monotonic()
    stop.set()
    polls = sum(await asyncio.gather(*tasks))
    return {"cpu_share": (cpu1 - cpu0) / (t1 - t0), "polls": polls}


def _stub_read(self: Any, workers: Any = None) -> LocalReading:
    """One statm read of this process, in place of a scan of a pod's process table."""
    rss = psutil.Process().memory_info().rss
    return LocalReading((LocalProcess(os.getpid(), 0.0, rss, None, "w"),))


async def measure_new(
    address: str, sched: psutil.Process, k: int, seconds: float
) -> dict[str, float]:
    settings = load_settings({"scheduler": address, "mode": "local", "listen": "127.0.0.1:0"})
    pollers = []
    for _ in range(k):
        poller = make_poller(settings, ExporterState(settings))
        assert not any(isinstance(r.source, SchedulerSource) for r in poller.runners)
        for r in poller.runners:
            if isinstance(r.source, SidecarSource):
                r.source.local.read = _stub_read.__get__(r.source.local)
        pollers.append(poller)
    conns0 = len(sched.net_connections(kind="tcp"))
    tasks = [asyncio.create_task(p.run()) for p in pollers]
    await asyncio.sleep(1.0)
    cpu0, t0 = _cpu(sched), time.monotonic()
    polls0 = sum(p.snapshot.polls_total for p in pollers)
    await asyncio.sleep(seconds)
    cpu1, t1 = _cpu(sched), time.monotonic()
    polls = sum(p.snapshot.polls_total for p in pollers) - polls0
    conns = len(sched.net_connections(kind="tcp")) - conns0
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return {"cpu_share": (cpu1 - cpu0) / (t1 - t0), "polls": polls, "new_connections": conns}


async def run(n: int, old_counts: list[int], new_count: int, seconds: float) -> dict[str, Any]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.sidecar_cost", "--serve", str(n)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        address = (await asyncio.to_thread(proc.stdout.readline)).strip()
        sched = psutil.Process(proc.pid)
        interval = float(heartbeat_interval(n))
        await asyncio.sleep(2)
        idle = await measure_old(address, sched, 0, interval, seconds)
        old = {k: await measure_old(address, sched, k, interval, seconds) for k in old_counts}
        new = await measure_new(address, sched, new_count, seconds)
    finally:
        proc.terminate()
        proc.wait(10)
    return {"n": n, "interval": interval, "idle": idle, "old": old, "new": new, "seconds": seconds}


def report(r: dict[str, Any]) -> str:
    idle = r["idle"]["cpu_share"]
    interval = r["interval"]
    lines = [
        f"Measured {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC on {psutil.cpu_count()} cores, "
        f"{platform.machine()}, Python {platform.python_version()} (shared with other jobs): a "
        f"scheduler with {r['n']} workers (heartbeat interval {interval:g} s), each count "
        f"measured over {r['seconds']:g} s; scheduler CPU in % of one core, its idle "
        f"{idle:.1%} subtracted.",
        "",
        "| design | sidecars | polls in the window | scheduler CPU added | per sidecar |",
        "|---|---|---|---|---|",
    ]
    per = []
    for k, m in r["old"].items():
        added = max(0.0, m["cpu_share"] - idle)
        per.append(added / k)
        lines.append(
            f"| old: `identity` per sidecar | {k} | {m['polls']:.0f} | {added:.2%} | "
            f"{added / k:.3%} |"
        )
    if per:
        each = sorted(per)[len(per) // 2]
        for k in (200, 1000):
            lines.append(f"| old, extrapolated | {k} | | {each * k:.1%} | {each:.3%} |")
    m = r["new"]
    added = m["cpu_share"] - idle
    lines.append(
        f"| new: no scheduler call | {r['new_count']} | {m['polls']:.0f} sidecar polls, "
        f"{m['new_connections']:.0f} scheduler connections | {added:+.2%} | 0 by design |"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    p.add_argument("--workers", type=int, default=1000)
    p.add_argument("--old", default="5,20,50", help="sidecar counts for the old design")
    p.add_argument("--new", type=int, default=1000, help="sidecar count for the new design")
    p.add_argument("--seconds", type=float, default=18.0)
    args = p.parse_args(argv)
    if args.serve:
        asyncio.run(serve(args.serve))
        return
    counts = [int(c) for c in args.old.split(",") if c]
    r = asyncio.run(run(args.workers, counts, args.new, args.seconds))
    r["new_count"] = args.new
    print(report(r))


if __name__ == "__main__":
    main()
