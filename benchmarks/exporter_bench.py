"""Benchmark of the exporter's hot paths at 1,000 and 5,000 workers, and of the scheduler side.

Run: ``.venv/bin/python -m benchmarks.exporter_bench`` (about a minute). It prints a Markdown
table; docs/performance.md records the results. Not a test: nothing here asserts a time.

- poll processing: decode of an identity answer plus the memory-model update, per poll
- render: both exposition formats plus gzip, once per poll (off the event loop)
- scrape: the /metrics handler serving the cached bytes (server side), and the round trip
  over loopback HTTP with a real client
- memory: the exporter's RSS after thousands of polls of 1,000 workers with churn
- scheduler side: time the scheduler spends in its ``identity`` handler (plus serialisation)
  with many real (in-process) workers

The worker entries are copies of a real one, taken from a live LocalCluster at start.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import gc
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import psutil
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from distributed import LocalCluster
from distributed.core import rpc
from distributed.protocol.core import dumps, loads

from dask_memory_exporter.app import STATE, metrics
from dask_memory_exporter.collector import Exposition
from dask_memory_exporter.config import load_settings
from dask_memory_exporter.memory import MemoryModel
from dask_memory_exporter.names import Metric
from dask_memory_exporter.scheduler import decode_identity
from dask_memory_exporter.snapshot import Poller, Snapshot
from dask_memory_exporter.source import SourceResult

MiB = 2**20
OM_ACCEPT = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"


def median_ms(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def in_process_cluster(n_workers: int) -> LocalCluster:
    """Workers in this process (over loopback TCP), so that many fit on two cores."""
    return LocalCluster(
        n_workers=n_workers,
        threads_per_worker=1,
        processes=False,
        protocol="tcp",
        host="127.0.0.1",
        scheduler_port=0,
        dashboard_address="127.0.0.1:0",
        asynchronous=True,
        memory_limit="1GiB",
    )


async def real_worker_entry() -> dict[str, Any]:
    """One worker entry of a live scheduler's identity answer, as it travels the wire."""
    async with (
        in_process_cluster(1) as cluster,
        rpc(cluster.scheduler_address) as r,
    ):
        await asyncio.sleep(1.5)  # a few heartbeats
        ident = await r.identity(n_workers=-1)
    return dict(next(iter(ident["workers"].values())))


def identity_of(entry: dict[str, Any], n: int, t: float, seed: int = 0) -> dict[str, Any]:
    workers = {}
    for i in range(n):
        e = copy.deepcopy(entry)
        addr = f"tcp://10.{i // 60000}.{(i // 250) % 240}.{i % 250}:{40000 + seed % 1000}"
        e["name"] = f"worker-{i}-{seed}"
        e["last_seen"] = t + (i % 7) * 0.01
        e["memory_limit"] = 4 * 1024 * MiB
        e["metrics"]["memory"] = (500 + (i * 37 + seed) % 3000) * MiB
        e["metrics"]["managed_bytes"] = ((i * 13 + seed) % 1500) * MiB
        workers[addr] = e
    return {"type": "Scheduler", "address": "tcp://10.0.0.1:8786", "workers": workers}


def bench_poll_and_render(entry: dict[str, Any], n: int) -> dict[str, float]:
    ident = identity_of(entry, n, time.time())
    wire = dumps({"op": "identity-reply", "result": ident})
    model = MemoryModel(30.0)
    out: dict[str, float] = {"payload_kib": sum(len(f) for f in wire) / 1024}
    out["unpack_ms"] = median_ms(lambda: loads(wire), 20)
    step = [0]

    def poll() -> None:
        step[0] += 1
        for w in ident["workers"].values():
            w["last_seen"] += 1.0
        poll_result = decode_identity(ident)
        model.update({a: w.reading for a, w in poll_result.workers.items()})

    out["poll_ms"] = median_ms(poll, 30)
    settings = load_settings({"scheduler": "tcp://10.0.0.1:8786"})
    snap = _snapshot(ident, model, settings.thresholds)
    out["render_ms"] = median_ms(lambda: Exposition.render(snap), 5)
    expo = Exposition.render(snap)
    out["samples"] = expo.text.count(b"\n") - expo.text.count(b"\n#")
    out["text_kib"] = len(expo.text) / 1024
    out["gzip_kib"] = len(expo.text_gzip) / 1024
    out.update(asyncio.run(_bench_scrape(expo, settings)))
    return out


def _snapshot(ident: dict[str, Any], model: MemoryModel, thresholds: dict[str, float]) -> Snapshot:
    async def publish(s: Snapshot) -> None:
        pass

    class Fixed:
        name = "scheduler"
        roster = True
        reasons: tuple[str, ...] = ()
        families: tuple[Metric, ...] = ()

        async def fetch(self, workers: Any) -> SourceResult:
            poll = decode_identity(ident)
            return SourceResult(workers=poll.workers, skipped=poll.skipped, values=poll.values)

        async def close(self) -> None:
            pass

    poller = Poller([Fixed()], model, thresholds, publish)
    return asyncio.run(poller.poll_once())


async def _bench_scrape(expo: Exposition, settings: Any) -> dict[str, float]:
    from dask_memory_exporter.app import make_app

    app = make_app(settings)
    app[STATE].exposition = expo
    app.cleanup_ctx.clear()  # no poller: serve the given exposition
    out: dict[str, float] = {}
    for label, headers in (
        ("handler_gzip_om_ms", {"Accept": OM_ACCEPT, "Accept-Encoding": "gzip"}),
        ("handler_text_ms", {}),
    ):
        req = make_mocked_request("GET", "/metrics", headers=headers, app=app)
        times = []
        for _ in range(200):
            t = time.perf_counter()
            await metrics(req)
            times.append(time.perf_counter() - t)
        out[label] = statistics.median(times) * 1000
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    times = []
    async with aiohttp.ClientSession() as s:
        for _ in range(50):
            t = time.perf_counter()
            async with s.get(
                f"http://127.0.0.1:{port}/metrics",
                headers={"Accept": OM_ACCEPT, "Accept-Encoding": "gzip"},
            ) as r:
                await r.read()
            times.append(time.perf_counter() - t)
    await runner.cleanup()
    out["http_roundtrip_ms"] = statistics.median(times) * 1000
    return out


def memory_soak(entry_json: str, n: int, polls: int) -> None:
    """Child process: RSS over many polls of ``n`` workers with 5% churn per poll."""
    entry = json.loads(entry_json)
    proc = psutil.Process()
    settings = load_settings({"scheduler": "tcp://10.0.0.1:8786"})
    model = MemoryModel(30.0)
    report = {}
    t = time.time()
    base = identity_of(entry, n, t)
    addrs = list(base["workers"])
    for i in range(polls):
        t += 1.0
        for j, a in enumerate(addrs):
            w = base["workers"][a]
            w["last_seen"] = t
            w["metrics"]["memory"] = (500 + (i * 7 + j) % 3000) * MiB
        # churn: 5% of workers replaced by new addresses every 10 polls
        if i % 10 == 0:
            for k in range(n // 20):
                old = addrs[(i + k) % n]
                new = old.rsplit(":", 1)[0] + f":{50000 + i % 10000}"
                base["workers"][new] = base["workers"].pop(old)
                addrs[(i + k) % n] = new
        poll = decode_identity(base)
        model.update({a: w.reading for a, w in poll.workers.items()})
        if i % 50 == 0:
            snap = _snapshot(base, model, settings.thresholds)
            Exposition.render(snap)
        if i in (100, polls // 2, polls - 1):
            gc.collect()
            report[str(i + 1)] = proc.memory_info().rss / MiB
    print(json.dumps(report))


async def scheduler_side(n_workers: int) -> dict[str, float]:
    """Time the scheduler's identity handler with ``n_workers`` real in-process workers."""
    async with in_process_cluster(n_workers) as cluster:
        sched = cluster.scheduler
        assert sched is not None
        while len(sched.workers) < n_workers:
            await asyncio.sleep(0.2)
        await asyncio.sleep(3)
        handler = median_ms(lambda: sched.identity(n_workers=-1), 50)
        msg = sched.identity(n_workers=-1)
        serialise = median_ms(lambda: dumps(msg), 20)
        times = []
        async with rpc(cluster.scheduler_address) as r:
            for _ in range(30):
                t = time.perf_counter()
                await r.identity(n_workers=-1)
                times.append(time.perf_counter() - t)
        return {
            "workers": n_workers,
            "handler_ms": handler,
            "serialise_ms": serialise,
            "roundtrip_ms": statistics.median(times) * 1000,
            "payload_kib": sum(len(f) for f in dumps(msg)) / 1024,
        }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="1000,5000")
    parser.add_argument("--soak-polls", type=int, default=3000)
    parser.add_argument("--scheduler-workers", type=int, default=200)
    parser.add_argument("--_soak", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._soak:
        memory_soak(args._soak, 1000, args.soak_polls)
        return
    entry = asyncio.run(real_worker_entry())
    print(f"machine: {psutil.cpu_count()} cores, Python {sys.version.split()[0]}\n")
    print(
        "| workers | samples | poll (decode+model) ms | render both formats+gzip ms | "
        "handler (cached, gzip OpenMetrics) ms | handler (text) ms | HTTP round trip ms | "
        "exposition KiB (gzip) | identity payload KiB | unpack ms |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n in (int(x) for x in args.sizes.split(",")):
        r = bench_poll_and_render(entry, n)
        print(
            f"| {n} | {r['samples']:.0f} | {r['poll_ms']:.1f} | {r['render_ms']:.0f} | "
            f"{r['handler_gzip_om_ms']:.3f} | {r['handler_text_ms']:.3f} | "
            f"{r['http_roundtrip_ms']:.1f} | {r['text_kib']:.0f} ({r['gzip_kib']:.0f}) | "
            f"{r['payload_kib']:.0f} | {r['unpack_ms']:.1f} |"
        )
    soak = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.exporter_bench",
            "--_soak",
            json.dumps(entry, default=str),
            "--soak-polls",
            str(args.soak_polls),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    rss = json.loads(soak.stdout.strip().splitlines()[-1])
    print("\nRSS of the exporter's poll+render path, 1,000 workers, 5% churn every 10 polls:")
    print(", ".join(f"after {k} polls: {v:.1f} MiB" for k, v in rss.items()))
    s = asyncio.run(scheduler_side(args.scheduler_workers))
    print(
        f"\nscheduler side, {s['workers']:.0f} real in-process workers: identity handler "
        f"{s['handler_ms']:.2f} ms, serialisation {s['serialise_ms']:.2f} ms, "
        f"round trip {s['roundtrip_ms']:.2f} ms, payload {s['payload_kib']:.0f} KiB"
    )


if __name__ == "__main__":
    main()
