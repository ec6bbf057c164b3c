"""What the remediation webhook costs: one remediation end to end, and a flood of refusals.

Runs a LocalCluster with one nanny-spawned worker (processes) and the exporter as a user runs
it (``serve --remediate gc,trim``, a subprocess), then:

1. ``ROUNDS`` authorized notifications for the worker, each acted on (``--remediate-interval``
   1 ms): the time from POST to answer, which is connecting a Dask client, ``gc.collect()``,
   ``malloc_trim(0)`` and closing the client;
2. ``FLOOD`` requests without the token, then as many authorized ones inside the interval
   (refused): requests per second, and the exporter's CPU seconds (psutil) per 1,000.

    .venv/bin/python -m benchmarks.remediation_webhook

Not a test: nothing here asserts; the figures are recorded in docs/remediation.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import psutil
from distributed import LocalCluster

from dask_memory_exporter.remediate import ALERT, WEBHOOK_PATH

ROUNDS = 10
FLOOD = 2000
TOKEN = "benchmark-token-0123456789abcdef"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _exporter(argv: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dask_memory_exporter", "serve", *argv],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _notification(address: str, name: str) -> bytes:
    labels = {"alertname": ALERT, "worker": address, "worker_name": name}
    return json.dumps({"version": "4", "alerts": [{"status": "firing", "labels": labels}]}).encode()


async def _wait_ready(session: aiohttp.ClientSession, url: str, workers: int) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with contextlib.suppress(aiohttp.ClientError):
            async with session.get(url + "/metrics") as r:
                text = await r.text()
                if text.count("dask_memory_worker_process_bytes{") >= workers:
                    return
        await asyncio.sleep(0.2)
    raise RuntimeError("the exporter did not report the worker")


async def _post(session: aiohttp.ClientSession, url: str, body: bytes, token: str | None) -> int:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    async with session.post(url + WEBHOOK_PATH, data=body, headers=headers) as r:
        await r.read()
        return r.status


async def main() -> dict[str, Any]:
    cluster: Any = await LocalCluster(
        n_workers=1,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        scheduler_port=0,
        dashboard_address="127.0.0.1:0",
        worker_dashboard_address="127.0.0.1:0",
        asynchronous=True,
        silence_logs=40,
    )
    results: dict[str, Any] = {}
    try:
        [(address, ws)] = cluster.scheduler.workers.items()
        body = _notification(address, str(ws.name))
        with tempfile.TemporaryDirectory() as tmp:
            token_file = Path(tmp) / "token"
            token_file.write_text(TOKEN)
            port = _free_port()
            url = f"http://127.0.0.1:{port}"
            common = [
                "--scheduler", cluster.scheduler_address, "--listen", f"127.0.0.1:{port}",
                "--remediate", "gc,trim", "--remediate-token-file", str(token_file),
                "--no-process-metrics", "--log-level", "WARNING",
            ]  # fmt: skip
            async with aiohttp.ClientSession() as session:
                with _exporter([*common, "--remediate-interval", "1ms"], Path(tmp) / "a.log"):
                    await _wait_ready(session, url, 1)
                    times = []
                    for _ in range(ROUNDS):
                        start = time.perf_counter()
                        assert await _post(session, url, body, TOKEN) == 200
                        times.append(time.perf_counter() - start)
                    results["remediation_ms"] = {
                        "median": 1000 * statistics.median(times),
                        "max": 1000 * max(times),
                    }
                with _exporter([*common, "--remediate-interval", "1h"], Path(tmp) / "b.log") as p:
                    await _wait_ready(session, url, 1)
                    assert await _post(session, url, body, TOKEN) == 200  # the one claim
                    proc = psutil.Process(p.pid)
                    for label, token in (("unauthorized", None), ("refused", TOKEN)):
                        cpu0 = sum(proc.cpu_times()[:2])
                        start = time.perf_counter()
                        for _ in range(FLOOD):
                            await _post(session, url, body, token)
                        wall = time.perf_counter() - start
                        cpu = sum(proc.cpu_times()[:2]) - cpu0
                        results[label] = {
                            "requests_per_second": FLOOD / wall,
                            "exporter_cpu_seconds_per_1000": 1000 * cpu / FLOOD,
                        }
    finally:
        await cluster.close()
    return results


if __name__ == "__main__":
    out = asyncio.run(main())
    print(json.dumps(out, indent=2))
