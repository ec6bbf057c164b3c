"""Gateway mode end to end: a real dask-gateway-server, the exporter's CLI and Prometheus.

dask-gateway-server (PyPI) runs its local backend on this machine (tests/support/gateway.py),
configured with deploy/dask-gateway/monitoring_user.py. Two users each create a cluster and
scale it, while ``dask-memory-exporter serve --gateway`` (logged in as the monitoring user) is
scraped by a real Prometheus every second with the generated rules. Every series carries the
cluster's name as ``cluster``; the recording rules count workers per cluster; a stopped
cluster's series go; a gateway that goes away is counted as errors and never stops the
exporter.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from dask_memory_exporter import names as n
from dask_memory_exporter.dashboards import CLUSTER_FILE, WORKER_FILE
from dask_memory_exporter.dashboards import render_files as render_dashboards
from dask_memory_exporter.gateway import GATEWAY_CLUSTERS, GATEWAY_UP
from dask_memory_exporter.mixin import MixinConfig
from dask_memory_exporter.rules import CLUSTER_WORKERS, render_files
from tests.e2e.test_dashboard_queries import grafana_regex_escape, queries, run
from tests.support.gateway import EXPORTER_USER, PASSWORD, GatewayServer, run_gateway, stop_gateway
from tests.support.live import Samples, eventually, parse, source_errors
from tests.support.promstack import Prometheus, free_port, run_prometheus

pytestmark = pytest.mark.timeout(400)

ROOT = Path(__file__).resolve().parents[2]
DEADLINE = 60.0  # seconds for anything to show up: a loaded 2-core machine is slow


@contextlib.contextmanager
def run_exporter(
    gateway: GatewayServer, port: int, workdir: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """``dask-memory-exporter serve --gateway`` as a subprocess, terminated on exit."""
    token = workdir / "gateway-password"
    token.write_text(PASSWORD + "\n")
    log = workdir / "exporter.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dask_memory_exporter",
                "serve",
                "--gateway",
                gateway.url,
                "--gateway-proxy-address",
                gateway.proxy_address,
                "--gateway-auth",
                "basic",
                "--gateway-user",
                EXPORTER_USER,
                "--gateway-api-token-file",
                str(token),
                "--gateway-list-interval",
                "1s",
                "--max-backoff",
                "2s",
                "--listen",
                f"127.0.0.1:{port}",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def readyz(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=10) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


def fetch(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
        return str(r.read().decode())


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return parse(r.read().decode())


def workers_by_cluster(samples: Samples) -> dict[str, int]:
    out: dict[str, int] = {}
    for (name, labels), _ in samples.items():
        if name == n.WORKER_PROCESS_BYTES:
            cluster = dict(labels)[n.LABEL_CLUSTER]
            out[cluster] = out.get(cluster, 0) + 1
    return out


async def prom_counts(prom: Prometheus, expr: str) -> dict[str, float]:
    samples = await asyncio.to_thread(prom.query, expr)
    return {s.labels.get("cluster", ""): s.value for s in samples}


def check_dashboard_per_cluster(prom: Prometheus, workers: dict[str, int]) -> None:
    """Every query of both dashboards runs with one cluster chosen in the ``cluster`` variable
    (as Grafana formats it); the Workers panel counts that cluster's only, and the worker
    dashboard offers that cluster's workers only."""
    doc = json.loads(render_dashboards(MixinConfig())[CLUSTER_FILE])
    worker_doc = json.loads(render_dashboards(MixinConfig())[WORKER_FILE])
    at = time.time()
    grafana = {"__rate_interval": "4s", "__interval": "1s", "__range": "5m", "datasource": ""}
    every = {"namespace": ".*", "job": ".*", "instance": ".*", "worker": ".*"}
    for cluster, expected in workers.items():
        values = {**grafana, **every, "cluster": grafana_regex_escape(cluster)}
        shown = {}
        for q in queries(doc, CLUSTER_FILE):
            shown[q.title] = run(prom, q, values, at)  # raises on a PromQL error
        assert [s.value for s in shown["Workers"]] == [expected], (cluster, shown["Workers"])
        assert {s.labels["cluster"] for s in shown["variable: cluster"]} == set(workers)
        # The worker dashboard offers that cluster's workers only, and its queries run.
        names = {
            s.labels[n.LABEL_WORKER_NAME]
            for s in prom.query(f'{n.WORKER_PROCESS_BYTES}{{cluster="{cluster}"}}', at)
        }
        assert len(names) == expected
        for q in queries(worker_doc, WORKER_FILE):
            result = run(prom, q, values, at)
            if q.title == "variable: worker":
                assert {s.labels[n.LABEL_WORKER_NAME] for s in result} == names


async def test_every_cluster_of_a_gateway_is_exported_with_its_name(tmp_path: Path) -> None:
    port = free_port()
    with run_gateway(tmp_path / "gateway") as gw:
        alice, bob = gw.client("alice"), gw.client("bob")
        try:
            with (
                run_exporter(gw, port, tmp_path) as exporter,
                run_prometheus(
                    scrape_targets=[f"127.0.0.1:{port}"], rule_texts=render_files(MixinConfig())
                ) as prom,
            ):
                await _scenario(gw, alice, bob, port, prom, exporter)
            log = (tmp_path / "exporter.log").read_text()
            assert "Traceback" not in log, log
            # The outage is logged once (the proxy's 502 or a refused connection, whichever
            # came first), not at every retry: the counter has the rest.
            assert log.count("gateway listing failed") == 1, log
        finally:
            for client in (alice, bob):
                # Clusters a failed run left (the scenario ends with the gateway stopped, and
                # stopping the gateway stops its clusters too).
                with contextlib.suppress(Exception):
                    for report in await client.list_clusters():
                        await client.stop_cluster(report.name)
                await client.close()


async def _scenario(
    gw: GatewayServer,
    alice: object,
    bob: object,
    port: int,
    prom: Prometheus,
    exporter: subprocess.Popen[bytes],
) -> None:
    from dask_gateway import Gateway

    assert isinstance(alice, Gateway) and isinstance(bob, Gateway)
    a = await alice.new_cluster(shutdown_on_close=False)
    b = await bob.new_cluster(shutdown_on_close=False)
    await a.scale(1)
    await b.scale(2)
    # What the gateway itself lets a user see: only their own clusters. The exporter's user
    # sees both only thanks to deploy/dask-gateway/monitoring_user.py.
    assert [r.name for r in await alice.list_clusters()] == [a.name]

    async def exported(expected: dict[str, int]) -> bool:
        return workers_by_cluster(await asyncio.to_thread(scrape, port)) == expected

    await eventually(lambda: exported({a.name: 1, b.name: 2}), DEADLINE, "both clusters' workers")
    samples = await asyncio.to_thread(scrape, port)
    for cluster in (a.name, b.name):
        assert samples[(n.SCHEDULER_UP, ((n.LABEL_CLUSTER, cluster),))] == 1
    assert samples[(GATEWAY_UP, ())] == 1
    assert samples[(GATEWAY_CLUSTERS, ())] == 2
    assert await asyncio.to_thread(readyz, port) == 200
    page = await asyncio.to_thread(fetch, port, "/")
    assert f"Gateway {gw.url}: <b>up</b>; 2 clusters (0 unreachable)" in page, page
    assert page.count(f"<td>{a.name}</td>") == 1 and page.count(f"<td>{b.name}</td>") == 2, page
    # the picture: one per cluster, under its name, each with its own cluster total
    assert page.count('<svg xmlns="http://www.w3.org/2000/svg" class="memory"') == 2, page
    assert f"<h2>{a.name}</h2>" in page and f"<h2>{b.name}</h2>" in page

    # Prometheus: raw series labelled by cluster, and the recording rules per cluster.
    async def in_prometheus(expr: str, expected: dict[str, float]) -> bool:
        return await prom_counts(prom, expr) == expected

    count = f"count by (cluster) ({n.WORKER_PROCESS_BYTES})"
    await eventually(lambda: in_prometheus(count, {a.name: 1, b.name: 2}), DEADLINE, count)
    await eventually(
        lambda: in_prometheus(CLUSTER_WORKERS, {a.name: 1, b.name: 2}), DEADLINE, CLUSTER_WORKERS
    )

    await asyncio.to_thread(check_dashboard_per_cluster, prom, {a.name: 1, b.name: 2})

    # Scaling one cluster shows in its series only.
    await a.scale(2)
    await eventually(lambda: exported({a.name: 2, b.name: 2}), DEADLINE, "alice's second worker")
    await eventually(lambda: in_prometheus(count, {a.name: 2, b.name: 2}), DEADLINE, "scale-up")

    # A stopped cluster's series go, from the exporter and then from Prometheus (stale marks).
    await a.shutdown()
    await eventually(lambda: exported({b.name: 2}), DEADLINE, "alice's cluster gone")
    await eventually(lambda: in_prometheus(count, {b.name: 2}), DEADLINE, "stale series gone")
    up = f"{n.SCHEDULER_UP}"
    await eventually(lambda: in_prometheus(up, {b.name: 1}), DEADLINE, "scheduler_up of bob only")
    await b.shutdown()

    async def none_left() -> bool:
        s = await asyncio.to_thread(scrape, port)
        return s[(GATEWAY_CLUSTERS, ())] == 0 and not workers_by_cluster(s)

    await eventually(none_left, DEADLINE, "no cluster left")
    samples = await asyncio.to_thread(scrape, port)
    assert not [k for k in samples if dict(k[1]).get(n.LABEL_CLUSTER)]  # no series of any

    # The gateway goes away: counted errors and gateway_up 0, the exporter serves on.
    stop_gateway(gw)

    async def gateway_down() -> bool:
        s = await asyncio.to_thread(scrape, port)
        return s.get((GATEWAY_UP, ())) == 0 and source_errors(s, "gateway", "refused") >= 2

    await eventually(gateway_down, DEADLINE, "gateway errors counted")
    assert await asyncio.to_thread(readyz, port) == 503
    assert exporter.poll() is None, "the exporter must not exit when the gateway is down"
