"""Remediation end to end, on the trim scenario, with every part real.

- A LocalCluster of nanny-spawned worker processes: ``trim`` (700 MiB limit) and
  ``bystander`` (2 GiB), both spawned without ``MALLOC_TRIM_THRESHOLD_`` (removed through
  ``distributed.nanny.pre-spawn-environ``), neither able to import ``dask_memory_exporter``.
  On each, many small objects are allocated and all but one in 64 freed: glibc keeps the
  fragmented heap, which only ``malloc_trim(0)`` gives back (the diagnose test's scenario).
- The exporter as a user runs it: ``dask-memory-exporter serve --remediate gc,trim
  --remediate-token-file F``, a subprocess.
- Prometheus 2.42 scraping it every second with the generated rules (``for: 2s`` for
  DaskWorkerMemoryHighNoDataToSpill), and Alertmanager with the example configuration merged
  as deploy/alertmanager/remediation.yaml says: the ``dask-remediate`` receiver posts to the
  exporter's webhook with the token file as bearer credentials; the other receivers post to a
  sink inside this test.

The story: requests without the token get 401 and change nothing (the bystander keeps its
heap); the trim worker's heap passes the spill threshold, the alert fires, reaches Alertmanager
and the webhook, gc and trim run on that worker only, its unmanaged memory drops and the alert
resolves; the heap is rebuilt, the alert fires again inside the interval, and the exporter
refuses and counts it, leaving the worker alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import cloudpickle
import dask.config
import pytest
import pytest_asyncio
import yaml
from distributed import Client, LocalCluster

from dask_memory_exporter import names as n
from dask_memory_exporter import worker_actions
from dask_memory_exporter.demo import wait_for_workers
from dask_memory_exporter.mixin import MixinConfig
from dask_memory_exporter.remediate import ALERT, WEBHOOK_PATH
from dask_memory_exporter.rules import render_files
from tests.support.alerting import Webhook, shorten_timings, webhook_receiver
from tests.support.cluster import loopback_cluster
from tests.support.live import Samples, by_worker_name, parse
from tests.support.promstack import free_port, run_alertmanager, run_prometheus
from tests.support.remediation import RECEIVER, merged_config
from tests.support.workloads import (
    PACKAGE,
    TRIM_VAR,
    block_package_import,
    environ_without_trim_threshold,
    fragment_heap,
)

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(420)]

MiB = 2**20
LIMIT = 700 * MiB
BYSTANDER_LIMIT = 2048 * MiB
FILL = 0.76  # of LIMIT: above spill (0.7), and unmanaged above target (0.6); below pause (0.8)
BYSTANDER_HEAP = 256 * MiB  # 12% of its limit plus its base: never alerts
TOKEN = "e2e-remediation-token-0123456789"
LIVE = dataclasses.replace(MixinConfig(), no_data_to_spill_for="2s")
REMEDIATIONS = "dask_memory_remediations_total"
RECLAIMED = "dask_memory_remediation_reclaimed_bytes_total"
REQUESTS = "dask_memory_remediation_webhook_requests_total"

# The workload runs on workers that cannot import this package nor the tests: by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


class Cluster:
    def __init__(self, cluster: LocalCluster, client: Client) -> None:
        self.cluster = cluster
        self.client = client

    def address(self, name: str) -> str:
        for addr, ws in self.cluster.scheduler.workers.items():
            if ws.name == name:
                return str(addr)
        raise KeyError(name)

    async def rss(self, name: str) -> int:
        addr = self.address(name)
        answers = await self.client.run(worker_actions.measure, workers=[addr])
        return int(answers[addr]["rss_bytes"])

    async def fragment(self, name: str, total: int) -> int:
        addr = self.address(name)
        answers = await self.client.run(fragment_heap, total, workers=[addr])
        return int(answers[addr])


@pytest.fixture(scope="module")
def clean_environ() -> Iterator[None]:
    with environ_without_trim_threshold():
        yield


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def cluster(clean_environ: None) -> AsyncIterator[Cluster]:
    lc = await loopback_cluster(LIMIT)
    try:
        template = next(iter(lc.new_worker_spec().values()))
        bystander = {
            **template,
            "options": {**template["options"], "memory_limit": BYSTANDER_LIMIT},
        }
        # The nanny reads pre-spawn-environ when it is created.
        with dask.config.set({f"distributed.nanny.pre-spawn-environ.{TRIM_VAR}": None}):
            lc.worker_spec["trim"] = template
            lc.worker_spec["bystander"] = bystander
            await lc._correct_state()
        await wait_for_workers(lc, 2)
        client = await Client(lc, asynchronous=True)
        try:
            await client.run(block_package_import)
            yield Cluster(lc, client)
        finally:
            await client.close()
    finally:
        await lc.close()


@contextlib.contextmanager
def run_exporter(argv: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``python -m dask_memory_exporter serve ARGV``; SIGTERM on exit, kill after 30 s."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", PACKAGE, "serve", *argv],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def live_config(sink_url: str, exporter_url: str, token_file: Path) -> str:
    """The merged example: the remediation receiver at the exporter with the test's token
    file, the others at the sink, every route's timings shortened."""
    config = merged_config()
    for receiver in config["receivers"]:
        for hook in receiver.get("webhook_configs", []):
            if receiver["name"] == RECEIVER:
                hook["url"] = exporter_url + WEBHOOK_PATH
                hook["http_config"]["authorization"]["credentials_file"] = str(token_file)
            else:
                hook["url"] = f"{sink_url}/{receiver['name']}"
                hook["send_resolved"] = True
    shorten_timings(config["route"])
    return yaml.safe_dump(config, sort_keys=False)


def counter(samples: Samples, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    return samples.get(key, 0.0)


class Scraper:
    def __init__(self, session: aiohttp.ClientSession, url: str, log: Path) -> None:
        self.session = session
        self.url = url
        self.log = log

    async def scrape(self) -> Samples:
        async with self.session.get(self.url + "/metrics") as r:
            assert r.status == 200
            return parse(await r.text())

    async def until(
        self, check: Callable[[Samples], bool], what: str, timeout: float = 90
    ) -> Samples:
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                samples = await self.scrape()
                if check(samples):
                    return samples
            if time.monotonic() > deadline:
                tail = self.log.read_text(errors="replace")[-3000:]
                raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{tail}")
            await asyncio.sleep(0.25)


async def eventually(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.25)


async def post(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any], headers: dict[str, str]
) -> int:
    async with session.post(url + WEBHOOK_PATH, json=body, headers=headers) as r:
        return r.status


def firing_alert(worker: str, worker_name: str) -> dict[str, Any]:
    labels = {"alertname": ALERT, "severity": "warning", "worker": worker}
    return {"status": "firing", "labels": labels | {"worker_name": worker_name}}


async def test_alert_to_webhook_to_gc_and_trim_then_resolved_and_a_second_alert_refused(
    cluster: Cluster, tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    port = free_port()
    exporter_url = f"http://127.0.0.1:{port}"
    log = tmp_path / "exporter.log"
    argv = [
        "--scheduler", cluster.cluster.scheduler_address, "--listen", f"127.0.0.1:{port}",
        "--remediate", "gc,trim", "--remediate-token-file", str(token_file),
        "--remediate-interval", "10m", "--no-process-metrics",
    ]  # fmt: skip
    base = await cluster.rss("trim")
    heap = int(FILL * LIMIT) - base
    assert heap > 200 * MiB, f"the worker's base RSS {base / MiB:.0f} MiB leaves too little room"
    timeout = aiohttp.ClientTimeout(total=30)
    async with (
        webhook_receiver() as (sink, sink_url),
        aiohttp.ClientSession(timeout=timeout) as session,
    ):
        with (
            run_exporter(argv, log),
            run_alertmanager(live_config(sink_url, exporter_url, token_file)) as am,
            run_prometheus(
                scrape_targets=[exporter_url + "/metrics"],
                rule_texts=render_files(LIVE),
                alertmanager_url=am.url,
            ) as prom,
        ):
            exporter = Scraper(session, exporter_url, log)
            await exporter.until(
                lambda s: set(by_worker_name(s, n.WORKER_PROCESS_BYTES)) == {"trim", "bystander"},
                "the exporter to report both workers",
            )

            # 1. Without the token: 401, and nothing runs. The bystander's fragmented heap is
            # what trim would give back, so it proves that trim did not run.
            bystander_rss = await cluster.fragment("bystander", BYSTANDER_HEAP)
            for name in ("bystander", "trim"):
                body = {"version": "4", "alerts": [firing_alert(cluster.address(name), name)]}
                assert await post(session, exporter_url, body, {}) == 401
                wrong = {"Authorization": "Bearer " + "x" * len(TOKEN)}
                assert await post(session, exporter_url, body, wrong) == 401
            samples = await exporter.until(  # request counters are rendered with each poll
                lambda s: counter(s, REQUESTS, code="401") == 4, "the 401s to be counted"
            )
            assert not any(v for (name, _), v in samples.items() if name == REMEDIATIONS)
            assert await cluster.rss("bystander") > bystander_rss - BYSTANDER_HEAP // 4

            # 2. The trim worker's heap passes the spill threshold: the alert fires, reaches
            # Alertmanager and the webhook, and gc and trim run on that worker.
            filled = await cluster.fragment("trim", heap)
            filled_at = time.monotonic()
            assert filled > 0.7 * LIMIT, f"{filled / MiB:.0f} MiB is not above spill"
            before = await exporter.until(
                lambda s: by_worker_name(s, n.WORKER_PROCESS_BYTES).get("trim", 0) > 0.7 * LIMIT,
                "the heartbeat to show the trim worker above spill",
            )
            unmanaged_before = _unmanaged(before, "trim")
            done = await exporter.until(
                lambda s: counter(s, REMEDIATIONS, action="trim", result="success") == 1,
                "the webhook to run trim",
                timeout=120,
            )
            done_at = time.monotonic()
            assert counter(done, REMEDIATIONS, action="gc", result="success") == 1
            assert counter(done, RECLAIMED, action="trim") >= heap // 2
            assert counter(done, REQUESTS, code="200") >= 1
            assert sink.first(ALERT, worker_name="trim") is not None  # routing continued
            assert "remediation: trim on worker trim" in log.read_text()

            # Unmanaged memory drops, and the alert resolves in Prometheus and Alertmanager.
            after = await exporter.until(
                lambda s: _unmanaged(s, "trim") < unmanaged_before - heap // 2,
                "the trim worker's unmanaged memory to drop",
            )
            assert by_worker_name(after, n.WORKER_PROCESS_BYTES)["trim"] < 0.7 * LIMIT
            selector = f'ALERTS{{alertname="{ALERT}",worker_name="trim"}}'

            async def resolved() -> bool:
                in_prometheus = await asyncio.to_thread(prom.query, selector)
                active = await asyncio.to_thread(am.alerts)
                in_am = [a for a in active if a["labels"].get("alertname") == ALERT]
                return not in_prometheus and not in_am

            await eventually(resolved, "the alert to resolve in Prometheus and Alertmanager")
            resolved_at = time.monotonic()
            # Only the alerted worker was acted on: the bystander kept its heap.
            assert await cluster.rss("bystander") > bystander_rss - BYSTANDER_HEAP // 4
            assert "worker bystander" not in log.read_text()

            # 3. The heap comes back, the alert fires again inside the interval: refused,
            # counted, and the worker is left as it is.
            firings = _firings(sink)
            refilled = await cluster.fragment("trim", heap)
            refused = await exporter.until(
                lambda s: counter(s, REMEDIATIONS, action="trim", result="refused") == 1,
                "the second alert to be refused",
                timeout=120,
            )
            assert counter(refused, REMEDIATIONS, action="gc", result="refused") == 1
            assert counter(refused, REMEDIATIONS, action="trim", result="success") == 1
            assert counter(refused, REMEDIATIONS, action="gc", result="success") == 1

            async def notified_again() -> bool:  # the chat receiver got the new firing too
                return _firings(sink) > firings

            await eventually(notified_again, "Alertmanager to notify the second firing")
            assert await cluster.rss("trim") > refilled - heap // 4
            assert "refused: acted on" in log.read_text()
    # What was measured, for docs/remediation.md (run with -s).
    print(
        f"\ntrim worker: base RSS {base / MiB:.0f} MiB, filled {filled / MiB:.0f} MiB, "
        f"trim reclaimed {counter(done, RECLAIMED, action='trim') / MiB:.0f} MiB, "
        f"gc reclaimed {counter(done, RECLAIMED, action='gc') / MiB:.0f} MiB; unmanaged "
        f"{unmanaged_before / MiB:.0f} -> {_unmanaged(after, 'trim') / MiB:.0f} MiB; "
        f"heap built -> remediated {done_at - filled_at:.1f} s (for: 2s), "
        f"remediated -> resolved {resolved_at - done_at:.1f} s"
    )


def _unmanaged(samples: Samples, worker_name: str) -> float:
    old = by_worker_name(samples, n.WORKER_UNMANAGED_BYTES).get(worker_name, 0.0)
    recent = by_worker_name(samples, n.WORKER_UNMANAGED_RECENT_BYTES).get(worker_name, 0.0)
    return old + recent


def _firings(sink: Webhook) -> int:
    return sum(
        1
        for d in sink.deliveries
        if d.name == ALERT and d.status == "firing" and d.labels.get("worker_name") == "trim"
    )
