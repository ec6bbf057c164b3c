"""Soak: the exporter's RSS, minute by minute, at 2,000 workers with churn. Not run in CI.

Run: ``.venv/bin/python -m benchmarks.soak [--minutes 30] [--workers 2000]``. The exporter is a
real ``dask-memory-exporter serve`` subprocess; the scheduler is a stand-in built on
distributed's own comm ``Server`` with an ``identity`` handler, because 2,000 real workers do not
fit on a small machine. Its worker entries are copies of a real one (taken from a live
LocalCluster at start), with fresh ``last_seen`` and moving memory figures on every call; every
``--churn-every`` seconds ``--churn`` workers leave and as many new ones (new addresses, new
names) join, so the exporter's per-worker state (memory model windows, label strings, caches)
is exercised the way a long-lived autoscaling cluster would. A scraper fetches ``/metrics``
every 15 s, like Prometheus.

It prints the RSS at the end of every minute and a verdict: the increase over the last half of
the run against the first half. Growth that continues in the second half is a leak; a rise
that flattens is settling (allocator arenas, the interpreter's caches, the memory model's
windows filling up).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import platform
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone
from typing import Any

import aiohttp
import psutil
from distributed.core import Server

from benchmarks.exporter_bench import real_worker_entry

MiB = 2**20


class StandIn:
    """A stand-in scheduler: an ``identity`` handler over distributed's comm, with churn."""

    def __init__(self, entry: dict[str, Any], n: int) -> None:
        self.entry = entry
        self.ids = list(range(n))
        self.next_id = n
        self.calls = 0
        self.server = Server({"identity": self.identity})

    def churn(self, k: int) -> None:
        """``k`` workers leave, ``k`` new ones join (new addresses and names)."""
        del self.ids[:k]
        self.ids.extend(range(self.next_id, self.next_id + k))
        self.next_id += k

    def identity(self, comm: Any = None, n_workers: int = -1) -> dict[str, Any]:
        self.calls += 1
        now = time.time()
        workers = {}
        for i in self.ids:
            e = copy.deepcopy(self.entry)
            e["name"] = f"worker-{i}"
            e["last_seen"] = now - (i % 7) * 0.1
            e["memory_limit"] = 4096 * MiB
            e["metrics"]["memory"] = (500 + (i * 37 + self.calls * 11) % 3000) * MiB
            e["metrics"]["managed_bytes"] = ((i * 13 + self.calls * 7) % 400) * MiB
            workers[f"tcp://10.{i // 60000}.{(i // 250) % 240}.{i % 250}:{40000 + i % 20000}"] = e
        return {"type": "Scheduler", "address": "tcp://127.0.0.1:0", "workers": workers}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _scrape(url: str, stop: asyncio.Event, counts: dict[str, int]) -> None:
    async with aiohttp.ClientSession() as session:
        while not stop.is_set():
            try:
                async with session.get(url, timeout=aiohttp.ClientTimeout(total=10)) as r:
                    await r.read()
                    counts["ok" if r.status == 200 else "failed"] += 1
            except (aiohttp.ClientError, asyncio.TimeoutError):
                counts["failed"] += 1
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), 15)


async def run(minutes: float, n: int, churn: int, churn_every: float) -> dict[str, Any]:
    entry = await real_worker_entry()
    standin = StandIn(entry, n)
    await standin.server.listen("tcp://127.0.0.1:0")
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "dask_memory_exporter", "serve",
         "--scheduler", standin.server.address, "--listen", f"127.0.0.1:{port}",
         "--log-level", "WARNING"],
    )  # fmt: skip
    ps = psutil.Process(proc.pid)
    stop = asyncio.Event()
    counts = {"ok": 0, "failed": 0}
    scraper = asyncio.create_task(_scrape(f"http://127.0.0.1:{port}/metrics", stop, counts))
    samples: list[tuple[float, float, int]] = []  # (minute, RSS MiB, identity calls)
    start = time.monotonic()
    next_churn = start + churn_every
    try:
        for minute in range(1, int(minutes) + 1):
            while time.monotonic() < start + minute * 60:
                if time.monotonic() >= next_churn:
                    standin.churn(churn)
                    next_churn += churn_every
                await asyncio.sleep(1)
            rss = ps.memory_info().rss / MiB
            samples.append((minute, rss, standin.calls))
            print(f"minute {minute:3d}: RSS {rss:6.1f} MiB, polls {standin.calls}", flush=True)
    finally:
        stop.set()
        await scraper
        proc.terminate()
        proc.wait(10)
        standin.server.stop()
    return {
        "samples": samples,
        "scrapes": counts,
        "joined": standin.next_id - n,
        "workers": n,
        "churn": churn,
        "churn_every": churn_every,
    }


def verdict(samples: list[tuple[float, float, int]]) -> str:
    rss = [s[1] for s in samples]
    if len(rss) < 4:
        return "too short to judge"
    half = len(rss) // 2
    first = rss[half - 1] - rss[0]
    second = rss[-1] - rss[half - 1]
    return (
        f"first half +{first:.1f} MiB, second half {second:+.1f} MiB; "
        f"range over the second half {min(rss[half:]):.1f}-{max(rss[half:]):.1f} MiB"
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=30)
    p.add_argument("--workers", type=int, default=2000)
    p.add_argument("--churn", type=int, default=100, help="workers replaced at each churn")
    p.add_argument("--churn-every", type=float, default=30.0, help="seconds between churns")
    args = p.parse_args(argv)
    result = asyncio.run(run(args.minutes, args.workers, args.churn, args.churn_every))
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(
        f"\nMeasured {when} on {psutil.cpu_count()} cores, {platform.machine()}, Python "
        f"{platform.python_version()}: {result['workers']} workers, {result['churn']} replaced "
        f"every {result['churn_every']:g} s ({result['joined']} joined in all), scrapes "
        f"{result['scrapes']['ok']} ok / {result['scrapes']['failed']} failed\n"
    )
    print("| minute | RSS (MiB) | polls so far |\n|---|---|---|")
    for minute, rss, calls in result["samples"]:
        print(f"| {minute:g} | {rss:.1f} | {calls} |")
    print(f"\n{verdict(result['samples'])}")


if __name__ == "__main__":
    main()
