"""The event-loop probe and how the sidecar source attaches it.

The "worker" is a small aiohttp server on loopback whose /health the test holds unanswered
(a stand-in for a blocked event loop: tests/integration/test_sidecar.py blocks a real worker's).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest_asyncio
from aiohttp import web

from dask_memory_exporter import names as n
from dask_memory_exporter.probe import EventLoopProbe, SidecarSource
from dask_memory_exporter.process import LocalProcessSource
from dask_memory_exporter.source import LocalOnlyProcess, SourceResult
from tests.support.live import free_port


class Worker:
    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.release.set()

    async def health(self, request: web.Request) -> web.Response:
        await self.release.wait()
        return web.Response(text="ok")


@pytest_asyncio.fixture
async def worker() -> AsyncIterator[tuple[Worker, str]]:
    w = Worker()
    app = web.Application()
    app.router.add_get("/health", w.health)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield w, f"http://127.0.0.1:{port}/health"
    finally:
        w.release.set()
        await runner.cleanup()


async def test_probe_climbs_while_unanswered_and_recovers(worker: tuple[Worker, str]) -> None:
    w, url = worker
    now = [0.0]
    probe = EventLoopProbe(url, timeout=0.3, clock=lambda: now[0])
    try:
        assert await probe.seconds() == 0.0  # answered at once (the clock did not move)
        w.release.clear()
        values = []
        for _ in range(4):  # each wait outlasts the request timeout: the age goes on
            v = await probe.seconds()
            now[0] += 1.0
            values.append(v)
        assert values[0] == 0.0 and values == sorted(values) and values[-1] >= 3.0
        w.release.set()
        for _ in range(20):
            v = await probe.seconds()
            if v is not None and v < 1.0:
                break
        assert v is not None and v < 1.0
    finally:
        await probe.close()


async def test_probe_of_nothing_listening_has_no_value() -> None:
    probe = EventLoopProbe(f"http://127.0.0.1:{free_port()}/health", timeout=1.0)
    try:
        assert await probe.seconds() is None
    finally:
        await probe.close()


def test_probe_attaches_to_the_only_worker_process() -> None:
    source = SidecarSource(local=LocalProcessSource(), probe=None)
    one = SourceResult(local_only=(LocalOnlyProcess("w", 1, 10),))
    attached = source._attach(one, 2.5)
    assert attached.local_only[0].values == {n.WORKER_EVENT_LOOP_PROBE_SECONDS: 2.5}
    matched = source._attach(SourceResult(rss={"tcp://a:1": 10}), 2.5)
    assert matched.values == {"tcp://a:1": {n.WORKER_EVENT_LOOP_PROBE_SECONDS: 2.5}}
    two = SourceResult(local_only=(LocalOnlyProcess("w", 1, 10), LocalOnlyProcess("v", 2, 10)))
    assert source._attach(two, 2.5) == two
