"""Faults, all real: a scheduler that dies and comes back, one that never answers, none at all."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from typing import Any

import aiohttp
import pytest
from distributed import Scheduler, Worker

from dask_memory_exporter import names as n
from tests.support.live import (
    by_worker_name,
    free_port,
    parse,
    scalar,
    serve_exporter,
    source_errors,
)


async def start_scheduler(port: int) -> Scheduler:
    return await Scheduler(host="127.0.0.1", port=port, dashboard=False, validate=False)


async def test_scheduler_restart_brings_up_to_zero_and_back() -> None:
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    scheduler = await start_scheduler(port)
    worker = await Worker(address, name="w1", host="127.0.0.1", nthreads=1)
    async with serve_exporter(scheduler=address, max_backoff=1.0, timeout=2.0) as ex:
        await ex.wait_for(
            lambda s: "w1" in by_worker_name(s, n.WORKER_PROCESS_BYTES), what="worker w1"
        )
        assert (await ex.get("/readyz"))[0] == 200

        await worker.close()
        await scheduler.close()
        s = await ex.wait_for(lambda s: scalar(s, n.SCHEDULER_UP) == 0, what="up to drop to 0")
        # The last good data is still served, flagged by scheduler_up 0; readiness is lost.
        assert "w1" in by_worker_name(s, n.WORKER_PROCESS_BYTES)
        assert (await ex.get("/readyz"))[0] == 503
        assert (await ex.get("/healthz"))[0] == 200
        errors_before = source_errors(s)
        assert errors_before >= 1

        scheduler = await start_scheduler(port)
        worker = await Worker(address, name="w2", host="127.0.0.1", nthreads=1)
        try:
            s = await ex.wait_for(
                lambda s: (
                    scalar(s, n.SCHEDULER_UP) == 1
                    and "w2" in by_worker_name(s, n.WORKER_PROCESS_BYTES)
                ),
                timeout=20,
                what="up back to 1 with the new worker",
            )
            assert "w1" not in by_worker_name(s, n.WORKER_PROCESS_BYTES)
            assert (await ex.get("/readyz"))[0] == 200
        finally:
            await worker.close()
            await scheduler.close()


async def _silent_server() -> tuple[asyncio.Server, int]:
    """A TCP server that accepts connections and never answers: a hung scheduler."""
    writers: list[asyncio.StreamWriter] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        await reader.read()  # until the client goes away

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def test_hung_scheduler_never_blocks_metrics() -> None:
    server, port = await _silent_server()
    async with server:
        async with serve_exporter(
            scheduler=f"tcp://127.0.0.1:{port}", timeout=1.0, max_backoff=1.0
        ) as ex:
            # Scrapes are answered while a poll hangs on the silent scheduler.
            for _ in range(5):
                started = time.monotonic()
                s = await ex.scrape()
                assert time.monotonic() - started < 2.0
                await asyncio.sleep(0.2)
            s = await ex.wait_for(
                lambda s: source_errors(s) >= 1,
                timeout=10,
                what="the poll to time out",
            )
            assert scalar(s, n.SCHEDULER_UP) == 0
            assert source_errors(s, reason="timeout") == source_errors(s) >= 1
            assert (await ex.get("/readyz"))[0] == 503


@pytest.mark.parametrize(
    ("address", "reason"),
    [("tcp://127.0.0.1:{port}", "refused"), ("tcp://no-such-host.invalid:8786", "dns")],
)
async def test_an_unreachable_scheduler_is_reported_at_once_with_its_cause(
    address: str, reason: str
) -> None:
    """A refused connection or an unresolvable name is down at the first poll, well within
    the 10 s timeout that distributed's own connect would retry for."""
    address = address.format(port=free_port())
    started = time.monotonic()
    async with serve_exporter(scheduler=address, timeout=10.0) as ex:
        s = await ex.wait_for(lambda s: source_errors(s) >= 1, timeout=5, what="an error")
        assert time.monotonic() - started < 5
        assert scalar(s, n.SCHEDULER_UP) == 0
        assert source_errors(s, reason=reason) == source_errors(s)


@pytest.fixture
def serve_process() -> Any:
    procs: list[subprocess.Popen[str]] = []

    def start(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        p = subprocess.Popen(
            [sys.executable, "-m", "dask_memory_exporter", "serve", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **(env or {})},
        )
        procs.append(p)
        return p

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=10)


async def _get(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s:
        async with s.get(url) as r:
            return r.status, await r.text()


async def _wait_http(url: str, timeout: float = 30) -> tuple[int, str]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await _get(url)
        except aiohttp.ClientError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def test_serve_without_scheduler_keeps_serving_and_recovers(serve_process: Any) -> None:
    """The real command: scheduler absent at start, then started; SIGTERM exits cleanly."""
    sched_port, http_port = free_port(), free_port()
    proc = serve_process(
        "--listen",
        f"127.0.0.1:{http_port}",
        "--max-backoff",
        "1s",
        env={"DASK_SCHEDULER_ADDRESS": f"tcp://127.0.0.1:{sched_port}"},
    )
    base = f"http://127.0.0.1:{http_port}"
    status, text = await _wait_http(base + "/metrics")
    assert status == 200 and scalar(parse(text), n.SCHEDULER_UP) == 0
    assert (await _get(base + "/readyz"))[0] == 503

    scheduler = await start_scheduler(sched_port)
    try:
        deadline = time.monotonic() + 20
        while (await _get(base + "/readyz"))[0] != 200:
            assert time.monotonic() < deadline, "exporter did not become ready"
            await asyncio.sleep(0.2)
        assert scalar(parse((await _get(base + "/metrics"))[1]), n.SCHEDULER_UP) == 1
    finally:
        await scheduler.close()
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0, out
    assert "Traceback" not in out


async def test_unusable_listen_address_is_one_line(serve_process: Any) -> None:
    server, port = await _silent_server()  # holds the port
    async with server:
        proc = serve_process("--scheduler", "tcp://127.0.0.1:1", "--listen", f"127.0.0.1:{port}")
        out, _ = await asyncio.to_thread(proc.communicate, timeout=30)
    assert proc.returncode == 2  # an unusable listen address is bad input, as the README says
    assert "Traceback" not in out
    assert "error" in out.lower() and str(port) in out
