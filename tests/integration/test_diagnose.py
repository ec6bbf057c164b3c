"""``dask-memory-exporter diagnose`` on a real LocalCluster of nanny-spawned worker processes.

Three workers, each with a real cause of unmanaged memory built on it through ``client.run``:

- ``garbage``: gc's automatic collection disabled (``client.run(gc.disable)``), then large
  buffers are left in reference cycles: ``gc.collect()`` frees them;
- ``trim``: spawned without ``MALLOC_TRIM_THRESHOLD_`` (removed through
  ``distributed.nanny.pre-spawn-environ``); it allocates many small (2 KiB) objects and
  frees all but one in 64, leaving glibc's heap fragmented: ``malloc_trim(0)`` frees it;
- ``leak``: it appends to a module-level list in the worker: nothing frees it.

Before anything runs, every worker is made unable to import ``dask_memory_exporter`` (the
canonical ``sys.modules[name] = None`` block), and the test proves it: the actions must travel
by value. The command itself runs as a subprocess, as a user would run it.
"""

from __future__ import annotations

import asyncio
import json
import pickle
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from typing import Any

import cloudpickle
import dask.config
import pytest
import pytest_asyncio
from distributed import Client, Event, LocalCluster

from dask_memory_exporter import worker_actions
from dask_memory_exporter.demo import wait_for_workers
from tests.support.cluster import loopback_cluster
from tests.support.promstack import free_port
from tests.support.workloads import (
    PACKAGE,
    TRIM_VAR,
    block_package_import,
    environ_without_trim_threshold,
    fragment_heap,
)

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(240)]

MiB = 2**20
LIMIT = 800 * MiB
PAYLOAD = 256 * MiB  # below target (60% of LIMIT): no spilling, no pausing, no gc by Dask

# The functions below run on workers that cannot import dask_memory_exporter, which this module
# imports: ship them by value like the actions. Only top-level ``Client.run`` functions honour
# the registry (a task's function inside a graph is pickled by reference), so the workloads
# run through ``client.run`` rather than as tasks.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def import_error() -> str:
    """On a worker: the exception ``import dask_memory_exporter.worker_actions`` raises."""
    try:
        __import__(PACKAGE + ".worker_actions")
    except ImportError as e:
        return type(e).__name__
    return "imported"


def load_by_reference(payload: bytes) -> str:
    """On a worker: unpickle a function pickled by reference; the exception's name."""
    try:
        pickle.loads(payload)
    except ImportError as e:
        return type(e).__name__
    return "loaded"


def make_garbage(total: int) -> None:
    """Leave ``total`` bytes of 1 MiB buffers in reference cycles (gc is disabled)."""
    for _ in range(total // MiB):
        cycle: list[Any] = [bytearray(b"\x01" * MiB)]
        cycle.append(cycle)


def leak(total: int) -> None:
    """Keep ``total`` bytes referenced from a module-level list in the worker."""
    import types

    mod = sys.modules.setdefault("diagnose_test_leak", types.ModuleType("diagnose_test_leak"))
    leaked = mod.__dict__.setdefault("LEAKED", [])
    leaked.extend(b"\x01" * MiB for _ in range(total // MiB))


class Live:
    def __init__(self, cluster: LocalCluster, client: Client) -> None:
        self.cluster = cluster
        self.client = client

    def address(self, name: str) -> str:
        for addr, ws in self.cluster.scheduler.workers.items():
            if ws.name == name:
                return str(addr)
        raise KeyError(name)

    async def arm(self) -> None:
        """(Re)build the garbage and the fragmentation; the leak is built once and stays."""
        c = self.client
        await c.run(gc_disable, workers=[self.address("garbage")])
        await c.run(make_garbage, PAYLOAD, workers=[self.address("garbage")])
        await c.run(fragment_heap, PAYLOAD, workers=[self.address("trim")])


def gc_disable() -> None:
    import gc

    gc.disable()


@pytest.fixture(scope="module")
def clean_environ() -> Iterator[None]:
    with environ_without_trim_threshold():
        yield


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def live(clean_environ: None) -> AsyncIterator[Live]:
    # The scheduler calls unmanaged memory "old" once it has stayed for recent-to-old-time
    # (read when the scheduler starts; it runs in this process). The leak verdict reads the
    # old part: 5 s instead of 30 s lets the leak become old before the tests, however late
    # a loaded machine gets to them.
    with dask.config.set({"distributed.worker.memory.recent-to-old-time": "5s"}):
        cluster = await _start_cluster()
    try:
        template = next(iter(cluster.new_worker_spec().values()))
        # The nanny reads pre-spawn-environ when it is created: the trim worker first, alone.
        with dask.config.set({f"distributed.nanny.pre-spawn-environ.{TRIM_VAR}": None}):
            cluster.worker_spec["trim"] = template
            await cluster._correct_state()
        cluster.worker_spec["garbage"] = template
        cluster.worker_spec["leak"] = template
        await cluster._correct_state()
        await wait_for_workers(cluster, 3)
        client = await Client(cluster, asynchronous=True)
        try:
            await client.run(block_package_import)
            live = Live(cluster, client)
            await client.run(leak, PAYLOAD, workers=[live.address("leak")])
            await _until_old(cluster, live.address("leak"), PAYLOAD)
            yield live
        finally:
            await client.close()
    finally:
        await cluster.close()


async def _until_old(cluster: LocalCluster, address: str, nbytes: int, timeout: float = 90) -> None:
    """Wait until the scheduler counts ``nbytes`` of the worker's unmanaged memory as old."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while cluster.scheduler.workers[address].memory.unmanaged_old < nbytes:
        assert loop.time() < deadline, "the leak never became old unmanaged memory"
        await asyncio.sleep(0.2)


async def _start_cluster() -> LocalCluster:
    return await loopback_cluster(LIMIT)


def diagnose(live: Live, *args: str) -> subprocess.CompletedProcess[str]:
    scheduler = live.cluster.scheduler_address
    return subprocess.run(
        [sys.executable, "-m", PACKAGE, "diagnose", "--scheduler", scheduler, *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


async def test_workers_cannot_import_the_package(live: Live) -> None:
    answers = await live.client.run(import_error)
    assert set(answers.values()) == {"ModuleNotFoundError"}
    by_reference = pickle.dumps(worker_actions.measure)  # what plain pickle would send
    answers = await live.client.run(load_by_reference, by_reference)
    assert set(answers.values()) == {"ModuleNotFoundError"}
    # ... while the registered module travels by value and runs there.
    answers = await live.client.run(worker_actions.measure)
    assert all(a["rss_bytes"] > 0 for a in answers.values())


async def test_each_worker_gets_its_verdict_in_json_and_table(live: Live) -> None:
    await live.arm()
    run = await _in_thread(diagnose, live, "--json", "--sample-time", "2s")
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    workers = {w["name"]: w for w in report["workers"]}
    assert {n: w["verdict"] for n, w in workers.items()} == {
        "garbage": "garbage",
        "trim": "allocator",
        "leak": "leak",
    }
    assert workers["garbage"]["gc"]["freed_bytes"] >= PAYLOAD // 2
    assert workers["trim"]["trim"]["freed_bytes"] >= PAYLOAD // 2
    assert workers["leak"]["unmanaged_after_bytes"] >= PAYLOAD
    assert workers["trim"]["malloc_trim_threshold"] is None
    assert workers["garbage"]["malloc_trim_threshold"] == "65536"
    assert "MALLOC_TRIM_THRESHOLD_=65536" in workers["trim"]["next_step"]
    assert all(w["executing_tasks"] == 0 for w in workers.values())

    await live.arm()  # gc and trim freed it: build it again for the table
    run = await _in_thread(diagnose, live, "--sample-time", "1s")
    assert run.returncode == 0, run.stderr
    rows = _table_rows(run.stdout)
    assert {n: r[-1] for n, r in rows.items()} == {
        "garbage": "garbage",
        "trim": "allocator",
        "leak": "leak",
    }
    assert rows["trim"][-2] == "unset"
    assert rows["garbage"][-2] == "65536"


async def test_one_worker_by_name_with_a_task_executing(live: Live) -> None:
    # A task that waits for an Event until the diagnosis is done. Event.wait travels by
    # reference to distributed: the worker never imports this test module.
    release = Event("diagnose-test-hold", client=live.client)
    held = live.client.submit(release.wait, workers=[live.address("leak")], pure=False)
    try:
        while not live.cluster.scheduler.workers[live.address("leak")].processing:
            await asyncio.sleep(0.05)
        run = await _in_thread(diagnose, live, "--json", "--sample-time", "0", "--worker", "leak")
    finally:
        await release.set()
        await held
    assert run.returncode == 0, run.stderr
    [only] = json.loads(run.stdout)["workers"]
    assert (only["name"], only["verdict"], only["executing_tasks"]) == ("leak", "leak", 1)


async def test_unknown_worker_is_one_line_and_exit_2(live: Live) -> None:
    run = await _in_thread(diagnose, live, "--worker", "nope")
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        "dask-memory-exporter diagnose: error: unknown worker 'nope' (known: garbage, leak, trim)"
    ]


async def test_unreachable_scheduler_is_one_line_and_exit_2() -> None:
    address = f"tcp://127.0.0.1:{free_port()}"
    run = await _in_thread(
        subprocess.run,
        [sys.executable, "-m", PACKAGE, "diagnose", "--scheduler", address, "--timeout", "1s"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2
    [line] = run.stderr.strip().splitlines()
    prefix = "dask-memory-exporter diagnose: error: cannot connect to scheduler"
    assert line.startswith(f"{prefix} {address}")


def _table_rows(text: str) -> dict[str, list[str]]:
    """Worker rows of the table, split on runs of two or more spaces."""
    import re

    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("WORKER"))
    rows: dict[str, list[str]] = {}
    for line in lines[header + 1 :]:
        if not line.strip():
            break
        cells = re.split(r"\s{2,}", line.strip())
        rows[cells[0]] = cells
    return rows


async def _in_thread(fn: Any, *args: Any, **kwargs: Any) -> Any:
    return await asyncio.to_thread(fn, *args, **kwargs)
