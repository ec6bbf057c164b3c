"""The alerts' recall on a real death: which alerts reached Alertmanager's webhook before a nanny
killed its worker for memory, and by how long.

A real cluster of nannies (``leak`` and ``idle``, each on its own loopback address), the
exporter served in this process, Prometheus 2.42 scraping it every second with the generated
rules (the short windows of tests/e2e/test_alerts_live.py) and Alertmanager with the committed
example configuration, its receivers pointed at a webhook in this test. The ``leak`` worker runs
a task that allocates 3 MiB a second until its nanny kills it at the terminate threshold. The
kill's time is the ``worker-restart-memory`` event's own timestamp on the scheduler.

The lead times printed here (run with ``-s``) are the ones recorded in docs/alerts.md.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest
from distributed import Client, LocalCluster, Nanny

from dask_memory_exporter import names as n
from dask_memory_exporter.demo import wait_for_workers
from dask_memory_exporter.rules import render_files
from tests.support.alerting import (
    LIVE,
    NO_DATA,
    PAUSED,
    PREDICTED,
    Webhook,
    live_alertmanager_config,
    webhook_receiver,
)
from tests.support.cluster import loopback_cluster
from tests.support.live import Samples, serve_exporter
from tests.support.promstack import run_alertmanager, run_prometheus

MiB = 2**20
LIMIT = 300 * MiB
NEAR = "DaskWorkerNearTermination"
KILLED = "DaskWorkerKilledForMemory"
LOST = "DaskWorkerLostUnexpectedly"
RECALL = dataclasses.replace(LIVE, killed_for_memory_window="2m", lost_unexpectedly_window="2m")
WARNINGS = (PREDICTED, NO_DATA, PAUSED, NEAR)


def leaker(step: int, pause: float):  # type: ignore[no-untyped-def]
    """A task that allocates ``step`` bytes every ``pause`` seconds until its worker dies (a
    closure: pickled by value for the workers)."""

    def leak() -> None:
        import time

        held = []
        while True:
            held.append(bytearray(b"\x01" * step))
            time.sleep(pause)

    return leak


async def start() -> LocalCluster:
    cluster = await loopback_cluster(LIMIT)
    template = next(iter(cluster.new_worker_spec().values()))
    for name, host in (("leak", "127.0.0.2"), ("idle", "127.0.0.3")):
        cluster.worker_spec[name] = {
            "cls": Nanny,
            "options": {**template["options"], "host": host, "name": name},
        }
    await cluster._correct_state()
    await wait_for_workers(cluster, 2)
    return cluster


def restarts(s: Samples) -> float:
    return sum(
        v
        for k, v in s.items()
        if k[0] == n.WORKER_MEMORY_RESTARTS_TOTAL and dict(k[1]).get("worker_name") == "leak"
    )


def _seen(hook: Webhook) -> list[tuple[float, str, str, str | None]]:
    return [
        (round(d.at, 1), d.status, d.name, d.labels.get("worker_name")) for d in hook.deliveries
    ]


@pytest.mark.timeout(240)
async def test_alerts_reach_the_webhook_before_a_real_nanny_kill() -> None:
    to_monotonic = time.monotonic() - time.time()
    cluster = await start()
    try:
        async with (
            Client(cluster, asynchronous=True) as client,
            serve_exporter(scheduler=cluster.scheduler_address) as exporter,
            webhook_receiver() as (hook, hook_url),
        ):
            with (
                run_alertmanager(live_alertmanager_config(hook_url)) as am,
                run_prometheus(
                    scrape_targets=[exporter.url + "/metrics"],
                    rule_texts=render_files(RECALL),
                    alertmanager_url=am.url,
                ) as prom,
            ):
                await asyncio.to_thread(prom.wait_for_targets, 60)
                await exporter.wait_for(lambda s: restarts(s) == 0, 60, "the leak worker at 0")
                assert cluster.scheduler is not None
                (address,) = [a for a, w in cluster.scheduler.workers.items() if w.name == "leak"]
                # 0.6 MiB every 0.2 s: 3 MiB/s, as the demo leaks.
                future = client.submit(leaker(3 * MiB // 5, 0.2), workers=[address], pure=False)
                await exporter.wait_for(lambda s: restarts(s) == 1, 150, "the nanny's kill")
                await client.cancel([future])  # restricted to the dead address: never again
                events = await client.get_events("worker-restart-memory")
                (killed_at,) = [t + to_monotonic for t, msg in events if msg["worker"] == address]
                deadline = time.monotonic() + 60
                while hook.first(KILLED, worker_name="leak") is None:
                    assert time.monotonic() < deadline, _seen(hook)
                    await asyncio.sleep(0.2)
                await asyncio.sleep(5)  # would DaskWorkerLostUnexpectedly come too?
                rule_errors = await asyncio.to_thread(prom.rule_errors)
    finally:
        await cluster.close()

    assert not rule_errors, rule_errors
    firsts = {name: hook.first(name, worker_name="leak") for name in (*WARNINGS, KILLED)}
    before = {
        name: killed_at - d.at
        for name, d in firsts.items()
        if d is not None and d.at < killed_at and name != KILLED
    }
    killed = firsts[KILLED]
    assert killed is not None and killed.at > killed_at, _seen(hook)
    assert killed.receiver == "dask-chat"
    # The recall: the warnings that exist to prevent the death arrived before it.
    assert {PREDICTED, NO_DATA} <= set(before), (before, _seen(hook))
    # The memory restart is DaskWorkerKilledForMemory's, not a loss of unknown cause.
    assert not [d for d in hook.deliveries if d.name == LOST], _seen(hook)
    assert not [d for d in hook.deliveries if d.labels.get("worker_name") == "idle"], _seen(hook)
    print(
        "\nbefore the kill: "
        + ", ".join(
            f"{name} {lead:.1f} s" for name, lead in sorted(before.items(), key=lambda x: -x[1])
        )
        + f"; {KILLED} {killed.at - killed_at:.1f} s after; not before the kill: "
        + ", ".join(sorted(set(WARNINGS) - set(before)) or ["none"])
    )
