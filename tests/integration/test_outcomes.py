"""Outcomes, for real: a nanny's memory kill and a SIGKILL, counted from the scheduler's log.

A real cluster of worker processes with nannies, each on its own loopback address (127.0.0.2,
.3, .4: one host per worker, as one pod per worker in Kubernetes). The ``leak`` worker runs a
task that really allocates memory steadily until its nanny kills it at the terminate
threshold; the ``victim`` worker holds computed results and is killed with SIGKILL, which its
nanny does not decide. The exporter reads only the scheduler's ``events`` handler, over Dask's
protocol, as in production.
"""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import pytest_asyncio
from distributed import Client, LocalCluster, Nanny, wait

from dask_memory_exporter import names as n
from dask_memory_exporter.demo import wait_for_workers
from tests.support.cluster import loopback_cluster
from tests.support.live import Exporter, Samples, serve_exporter

pytestmark = pytest.mark.asyncio(loop_scope="module")

MiB = 2**20
LIMIT = 300 * MiB
HOSTS = {"leak": "127.0.0.2", "idle": "127.0.0.3", "victim": "127.0.0.4"}


def leaker(step: int, pause: float) -> Callable[[], None]:
    """A task that allocates ``step`` bytes (written: really resident) every ``pause`` seconds
    until its worker dies. A closure, so that it is pickled by value for the workers."""

    def leak() -> None:
        import time

        held = []
        while True:
            held.append(bytearray(b"\x01" * step))
            time.sleep(pause)

    return leak


async def start(roles: dict[str, str]) -> LocalCluster:
    """A LocalCluster of nannies, each worker on the loopback address given for its name."""
    cluster = await loopback_cluster(LIMIT)
    template = next(iter(cluster.new_worker_spec().values()))
    assert template["cls"] is Nanny
    for name, host in roles.items():
        cluster.worker_spec[name] = {
            "cls": Nanny,
            "options": {**template["options"], "host": host, "name": name},
        }
    await cluster._correct_state()
    await wait_for_workers(cluster, len(roles))
    return cluster


class Live:
    def __init__(self, cluster: LocalCluster, client: Client) -> None:
        self.cluster = cluster
        self.client = client

    def address(self, name: str) -> str | None:
        """The worker's current address (None while it is restarting)."""
        assert self.cluster.scheduler is not None
        for addr, ws in self.cluster.scheduler.workers.items():
            if ws.name == name:
                return str(addr)
        return None


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def live() -> AsyncIterator[Live]:
    cluster = await start(HOSTS)
    try:
        client = await Client(cluster, asynchronous=True)
        yield Live(cluster, client)
        await client.close()
    finally:
        await cluster.close()


def restarts(s: Samples) -> dict[str, float]:
    return {
        dict(k[1])[n.LABEL_WORKER_NAME]: v
        for k, v in s.items()
        if k[0] == n.WORKER_MEMORY_RESTARTS_TOTAL
    }


def labelled(s: Samples, metric: str, label: str) -> dict[str, float]:
    return {dict(k[1])[label]: v for k, v in s.items() if k[0] == metric}


def lost(s: Samples) -> dict[str, float]:
    return labelled(s, n.WORKERS_LOST_TOTAL, n.LABEL_CAUSE)


def polls(s: Samples) -> float:
    return s[(n.EXPORTER_POLLS_TOTAL, ())]


async def settled(exporter: Exporter, what: str, check: Callable[[Samples], bool]) -> Samples:
    return await exporter.wait_for(check, timeout=60, what=what)


async def test_a_nanny_memory_kill_counts_once_and_survives_an_exporter_restart(
    live: Live,
) -> None:
    address = live.cluster.scheduler_address
    every = set(HOSTS)
    async with serve_exporter(scheduler=address) as exporter:
        s = await settled(exporter, "every worker at 0", lambda s: set(restarts(s)) == every)
        assert restarts(s) == dict.fromkeys(every, 0)
        old = live.address("leak")
        assert old is not None
        # 8 MiB every 50 ms: from ~100 MiB to the terminate threshold (95% of 300 MiB) in a
        # few seconds, through the pause threshold (80%), which does not stop a running task.
        future = live.client.submit(leaker(8 * MiB, 0.05), workers=[old], pure=False)
        s = await settled(exporter, "the kill", lambda s: restarts(s).get("leak", 0) >= 1)
        assert restarts(s) == {"leak": 1, "idle": 0, "victim": 0}
        # Its restarted worker is back under the same name, at another address.
        s = await settled(
            exporter, "the new worker", lambda s: live.address("leak") not in (None, old)
        )
        # The task was restricted to the dead address: it cannot run again (and kill again).
        await live.client.cancel([future])
        s = await settled(
            exporter,
            "the departure counted",
            lambda s: lost(s)[n.CAUSE_MEMORY_RESTART] == 1,
        )
        assert lost(s) == {**dict.fromkeys(n.CAUSES, 0), n.CAUSE_MEMORY_RESTART: 1}
        assert labelled(s, n.LOST_TASKS_TOTAL, n.LABEL_KIND)[n.TASKS_PROCESSING] == 1
        # Polls go on; the count stays.
        later = polls(s) + 5
        s = await settled(exporter, "five more polls", lambda s: polls(s) >= later)
        assert restarts(s) == {"leak": 1, "idle": 0, "victim": 0}

    # A new exporter rebuilds the count from the scheduler's log: the same value.
    async with serve_exporter(scheduler=address) as exporter:
        s = await settled(exporter, "the rebuilt count", lambda s: set(restarts(s)) == every)
        assert restarts(s) == {"leak": 1, "idle": 0, "victim": 0}
        later = polls(s) + 5
        s = await settled(exporter, "five more polls", lambda s: polls(s) >= later)
        assert restarts(s) == {"leak": 1, "idle": 0, "victim": 0}
        # Departures seen by the exporter before it restarted are not counted again.
        assert sum(lost(s).values()) == 0


async def test_a_sigkilled_worker_is_lost_unexpectedly_with_its_computed_tasks(
    live: Live,
) -> None:
    victim = live.address("victim")
    assert victim is not None
    held = live.client.map(lambda i: b"\x02" * (i + 1) * MiB, range(5), workers=[victim])
    await wait(held)
    async with serve_exporter(scheduler=live.cluster.scheduler_address) as exporter:
        s = await settled(exporter, "every worker", lambda s: set(restarts(s)) == set(HOSTS))
        before = restarts(s)
        pids: dict[str, Any] = await live.client.run(os.getpid, workers=[victim])
        os.kill(pids[victim], signal.SIGKILL)  # the nanny does not decide this one
        s = await settled(
            exporter,
            "the loss",
            lambda s: sum(lost(s).values()) >= 1,
        )
        assert lost(s) == {**dict.fromkeys(n.CAUSES, 0), n.CAUSE_CONNECTION_LOST: 1}
        tasks = labelled(s, n.LOST_TASKS_TOTAL, n.LABEL_KIND)
        assert tasks == {n.TASKS_COMPUTED: 5, n.TASKS_SCATTERED: 0, n.TASKS_PROCESSING: 0}
        assert restarts(s) == before  # not a memory restart
    await live.client.cancel(held)
