"""Test support: free ports, an exporter served over real HTTP, and scraping helpers."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from dask_memory_exporter.app import STATE, ExporterState, make_app
from dask_memory_exporter.config import Settings, load_settings
from dask_memory_exporter.names import EXPORTER_SOURCE_ERRORS_TOTAL
from tests.support.promstack import free_port

__all__ = [
    "Exporter",
    "by_worker_name",
    "eventually",
    "free_port",
    "parse",
    "scalar",
    "serve_exporter",
    "source_errors",
]

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    out: Samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def by_worker_name(samples: Samples, metric: str) -> dict[str, float]:
    """{worker_name: value} of one per-worker family."""
    return {dict(k[1])["worker_name"]: v for k, v in samples.items() if k[0] == metric}


def scalar(samples: Samples, metric: str) -> float | None:
    return samples.get((metric, ()))


def source_errors(samples: Samples, source: str = "scheduler", reason: str | None = None) -> float:
    """``dask_memory_exporter_source_errors_total`` of one source, all reasons or one."""
    return sum(
        v
        for (name, labels), v in samples.items()
        if name == EXPORTER_SOURCE_ERRORS_TOTAL
        and dict(labels).get("source") == source
        and reason in (None, dict(labels).get("reason"))
    )


class Exporter:
    """An exporter app served on 127.0.0.1:<free port> in the current event loop."""

    def __init__(self, app: web.Application, url: str, session: aiohttp.ClientSession) -> None:
        self.app = app
        self.url = url
        self.session = session

    @property
    def state(self) -> ExporterState:
        return self.app[STATE]

    async def get(self, path: str, **headers: str) -> tuple[int, dict[str, str], bytes]:
        async with self.session.get(self.url + path, headers=headers, auto_decompress=False) as r:
            body = await r.read()
            if r.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            return r.status, dict(r.headers), body

    async def scrape(self) -> Samples:
        status, _, body = await self.get("/metrics")
        assert status == 200
        return parse(body.decode())

    async def wait_for(
        self, predicate: Callable[[Samples], bool], timeout: float = 30, what: str = ""
    ) -> Samples:
        deadline = time.monotonic() + timeout
        while True:
            samples = await self.scrape()
            if predicate(samples):
                return samples
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}")
            await asyncio.sleep(0.2)


@contextlib.asynccontextmanager
async def serve_exporter(**overrides: Any) -> AsyncIterator[Exporter]:
    """Run the exporter app (poller included) on a free loopback port."""
    port = free_port()
    settings: Settings = load_settings({"listen": f"127.0.0.1:{port}", **overrides})
    app = make_app(settings)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            yield Exporter(app, f"http://127.0.0.1:{port}", session)
    finally:
        await runner.cleanup()


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.1)
