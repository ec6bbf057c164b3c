"""``dask-memory-exporter demo``: a LocalCluster, a scripted workload and the exporter at work.

Three worker processes (loopback, free ports, a small memory limit), each named after its role:

leak
    leaks unmanaged memory at a steady rate (a module-level list on the worker, invisible to
    the scheduler) until it is past the pause threshold, holds there, then frees it and
    starts again: unmanaged (old) climbs 30 s behind process memory, and the worker pauses.
spill
    holds more managed data than its limit allows, replacing the oldest block every couple of
    seconds: managed bytes sit near the target and the rest is spilled to disk. Healthy.
idle
    does nothing: the baseline of an interpreter with distributed imported.

The workload runs through the worker's event loop (``Client.run``) for the leak, so it goes on
while the worker is paused, and through ordinary tasks for the spill.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import gc
import logging
import os
import signal
import sys
import time
from collections import deque
from typing import Any, cast

import psutil
from aiohttp import web
from dask.utils import format_bytes, parse_bytes
from distributed import Client, Future, LocalCluster, Scheduler

from .app import STATE, make_app
from .config import ConfigError, load_settings, parse_listen
from .memory import MemoryBreakdown

__all__ = ["run_demo"]

logger = logging.getLogger(__name__)

# --- code that runs on the workers (imported there by reference) --------------------------
_LEAKED: list[bytes] = []


def leak_step(nbytes: int, cap: int) -> int:
    """Leak ``nbytes`` unless RSS is already at ``cap``; return RSS. Runs on a worker."""
    rss = psutil.Process().memory_info().rss
    if rss < cap:
        _LEAKED.append(b"\x01" * nbytes)  # written, so the pages are really resident
    return int(rss)


def release_leak() -> int:
    """Free the leaked memory and hand it back to the OS; return RSS. Runs on a worker."""
    _LEAKED.clear()
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    return int(psutil.Process().memory_info().rss)


def dask_setup(worker: object) -> None:
    """Worker preload: ignore SIGINT, so Ctrl-C in a terminal stops the demo quietly.

    The terminal sends SIGINT to the whole foreground process group, worker processes
    included; each would die of KeyboardInterrupt with a traceback and its nanny would log
    the lost worker. The demo closes its workers itself when it gets the signal.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def make_block(i: int, nbytes: int) -> bytes:
    """A block of incompressible managed data (random, so spilled bytes equal its size)."""
    return os.urandom(nbytes)


# --- the driver -------------------------------------------------------------------------------
ROLES = {
    "all": ("leak", "spill", "idle"),
    "leak": ("leak",),
    "spill": ("spill",),
    "idle": ("idle",),
}


async def start_cluster(roles: tuple[str, ...], memory_limit: int) -> LocalCluster:
    cluster = await LocalCluster(
        n_workers=0,
        threads_per_worker=1,
        processes=True,
        memory_limit=memory_limit,
        host="127.0.0.1",
        scheduler_port=0,
        dashboard_address="127.0.0.1:0",
        worker_dashboard_address="127.0.0.1:0",
        asynchronous=True,
        silence_logs=logging.ERROR,
        preload=[__name__],  # dask_setup above, in every worker process
    )
    template = next(iter(cluster.new_worker_spec().values()))
    for role in roles:
        cluster.worker_spec[role] = template
    await cluster._correct_state()
    return cluster


async def wait_for_workers(cluster: LocalCluster, n: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while (have := len(_scheduler(cluster).workers)) < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {have} of {n} workers started")
        await asyncio.sleep(0.1)


def _scheduler(cluster: LocalCluster) -> Scheduler:
    assert cluster.scheduler is not None, "LocalCluster runs its scheduler in-process"
    return cast(Scheduler, cluster.scheduler)


def _address_of(cluster: LocalCluster, name: str) -> str | None:
    for addr, ws in _scheduler(cluster).workers.items():
        if ws.name == name:
            return str(addr)
    return None


async def leak_driver(
    client: Client, cluster: LocalCluster, limit: int, rate: int, hold: float = 30.0
) -> None:
    """Leak ``rate`` bytes a second on worker 'leak' up to 85% of the limit, hold, free, repeat."""
    cap = int(0.85 * limit)
    step = 0.5
    while True:
        held_since: float | None = None
        while True:
            addr = _address_of(cluster, "leak")
            if addr is None:  # restarting
                await asyncio.sleep(step)
                continue
            try:
                out = await client.run(leak_step, int(rate * step), cap, workers=[addr])
            except Exception as e:  # the worker may be restarting under our feet
                logger.debug("leak step failed: %s", e)
                await asyncio.sleep(step)
                continue
            rss = next(iter(out.values()))
            if rss >= cap:
                held_since = held_since or time.monotonic()
                if time.monotonic() - held_since >= hold:
                    break
            await asyncio.sleep(step)
        addr = _address_of(cluster, "leak")
        if addr:
            with contextlib.suppress(Exception):
                await client.run(release_leak, workers=[addr])
        await asyncio.sleep(10)


async def spill_driver(client: Client, limit: int) -> None:
    """Keep ~1.2 x the limit of managed data on worker 'spill', replacing a block every 2 s."""
    block = max(1, limit // 25)
    held: deque[Future[bytes]] = deque()
    i = 0
    while True:
        fut = client.submit(
            make_block, i, block, workers=["spill"], allow_other_workers=False, pure=False
        )
        held.append(fut)
        i += 1
        while len(held) * block > 1.2 * limit:
            held.popleft().release()
        await asyncio.sleep(2 if len(held) * block >= limit else 0.5)


def _summary(name: str, mem: MemoryBreakdown, status: str) -> str:
    f = format_bytes
    return (
        f"{name:>5}: process {f(mem.process):>10}  managed {f(mem.managed):>10}  "
        f"unmanaged {f(mem.unmanaged_old):>10}  recent {f(mem.unmanaged_recent):>10}  "
        f"spilled {f(mem.spilled):>10}  {status}"
    )


async def _report(app: web.Application, every: float = 10.0) -> None:
    while True:
        await asyncio.sleep(every)
        snap = app[STATE].snapshot
        lines = [_summary(w.info.name, w.memory, w.info.status) for w in snap.workers]
        print("\n".join(sorted(lines)), flush=True)


async def _demo(args: argparse.Namespace) -> int:
    limit = parse_bytes(args.memory_limit)
    rate = parse_bytes(args.leak_rate)
    roles = ROLES[args.scenario]
    try:  # before the cluster starts: a bad address costs no start-up
        parse_listen(args.listen)
    except ValueError as e:
        raise ConfigError(f"--listen: {e}") from None
    cluster = await start_cluster(roles, limit)
    tasks: list[asyncio.Task[Any]] = []
    runner: web.AppRunner | None = None
    client: Client | None = None
    try:
        client = await Client(cluster, asynchronous=True)
        await wait_for_workers(cluster, len(roles))
        settings = load_settings({"listen": args.listen, "scheduler": cluster.scheduler_address})
        app = make_app(settings)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, settings.listen_host, settings.listen_port)
        await site.start()
        host, port = runner.addresses[0][:2]
        dashboard = cluster.dashboard_link.replace("/status", "")
        print(f"scheduler: {cluster.scheduler_address}", flush=True)
        print(f"dask dashboard: {dashboard}/status", flush=True)
        print(f"exporter: http://{host}:{port}/metrics", flush=True)
        print(f"landing page: http://{host}:{port}/", flush=True)
        print(f"workers: {', '.join(roles)} (limit {format_bytes(limit)} each)", flush=True)
        print("press Ctrl-C to stop", flush=True)
        if "leak" in roles:
            tasks.append(asyncio.create_task(leak_driver(client, cluster, limit, rate)))
        if "spill" in roles:
            tasks.append(asyncio.create_task(spill_driver(client, limit)))
        tasks.append(asyncio.create_task(_report(app)))
        await _wait_stop(args.duration)
        print("stopping", flush=True)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if runner is not None:
            await runner.cleanup()
        if client is not None:
            with contextlib.suppress(Exception):
                await client.close()
        await cluster.close()  # type: ignore[misc]
    return 0


async def _wait_stop(duration: float | None) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=duration)


def run_demo(args: argparse.Namespace) -> int:
    """Run the demo until Ctrl-C (or ``--duration``)."""
    try:
        return asyncio.run(_demo(args))
    except ValueError as e:
        print(f"dask-memory-exporter: error: {e}", file=sys.stderr)
        return 2
