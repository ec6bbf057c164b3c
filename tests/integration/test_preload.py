"""The scheduler preload on real schedulers: a LocalCluster of worker processes started with
``scheduler_kwargs={"preload": ...}``, and bare in-process Schedulers for the failure modes.

The exporter runs inside the scheduler, so its figures can be compared with the scheduler's
own ``WorkerState.memory`` exactly, whenever no heartbeat arrived since the exporter's poll.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from distributed import Client, LocalCluster, Scheduler, wait

from dask_memory_exporter import names as n
from dask_memory_exporter import preload
from dask_memory_exporter.app import STATE, ExporterState
from dask_memory_exporter.demo import leak_step, make_block
from tests.support.cluster import loopback_cluster
from tests.support.live import by_worker_name, parse, scalar

pytestmark = pytest.mark.asyncio(loop_scope="module")

MiB = 2**20
LIMIT = 400 * MiB
PRELOAD = "dask_memory_exporter.preload"
BREAKDOWN = (
    n.WORKER_PROCESS_BYTES,
    n.WORKER_MANAGED_BYTES,
    n.WORKER_UNMANAGED_BYTES,
    n.WORKER_UNMANAGED_RECENT_BYTES,
    n.WORKER_SPILLED_BYTES,
)


class Cluster:
    def __init__(self, cluster: LocalCluster, client: Client, file_sd: Path) -> None:
        self.cluster = cluster
        self.client = client
        self.file_sd = file_sd
        self.exporter = preload.running(cluster.scheduler)
        assert self.exporter is not None, "the preload did not start"

    @property
    def scheduler(self) -> Any:
        return self.cluster.scheduler

    @property
    def state(self) -> ExporterState:
        assert self.exporter is not None and self.exporter.server.app is not None
        return self.exporter.server.app[STATE]

    @property
    def url(self) -> str:
        assert self.exporter is not None
        return self.exporter.url

    async def until_polled_all_workers(self, timeout: float = 60) -> None:
        """Wait for a published poll that holds every worker the scheduler has."""
        deadline = time.monotonic() + timeout
        while True:
            expo = self.state.exposition
            polled = {w.info.address for w in expo.snapshot.workers} if expo else set()
            if len(self.scheduler.workers) == 2 and polled == set(self.scheduler.workers):
                return
            assert time.monotonic() < deadline, (
                f"polled {polled}, scheduler has {set(self.scheduler.workers)}"
            )
            await asyncio.sleep(0.1)

    async def get(self, path: str) -> tuple[int, str]:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
            session.get(self.url + path) as r,
        ):
            return r.status, await r.text()


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def live(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Cluster]:
    file_sd = tmp_path_factory.mktemp("file_sd") / "dask.json"
    argv = [
        "--memory-exporter-port", "0",
        "--memory-exporter-host", "127.0.0.1",
        "--memory-exporter-file-sd", str(file_sd),
        "--memory-exporter-cluster", "hpc-test",
    ]  # fmt: skip
    cluster = await loopback_cluster(
        LIMIT, n_workers=2, scheduler_kwargs={"preload": [PRELOAD], "preload_argv": argv}
    )
    try:
        client = await Client(cluster, asynchronous=True)
        try:
            live = Cluster(cluster, client, file_sd)
            await live.until_polled_all_workers()
            yield live
        finally:
            await client.close()
    finally:
        await cluster.close()


async def test_metrics_equal_the_schedulers_memory_state(live: Cluster) -> None:
    """Managed data on one worker, leaked memory on the other: every figure of /metrics is
    the scheduler's own ``WorkerState.memory``, exactly, when both saw the same heartbeat."""
    a, b = sorted(live.scheduler.workers)
    held = [live.client.submit(make_block, i, 8 * MiB, workers=[a], pure=False) for i in range(6)]
    await wait(held)
    for _ in range(4):
        await live.client.run(leak_step, 10 * MiB, LIMIT, workers=[b])

    compared = 0
    deadline = time.monotonic() + 60
    while compared < 6:
        assert time.monotonic() < deadline, f"only {compared} same-heartbeat comparisons"
        expo = live.state.exposition
        status, body = await live.get("/metrics")
        assert status == 200
        if live.state.exposition is not expo:
            continue  # a poll published while we scraped: the body is the newer one
        assert body.encode() == expo.text
        samples = parse(body)
        # No await from here on: the exposition and the scheduler's state are one instant.
        for w in expo.snapshot.workers:
            ws = live.scheduler.workers.get(w.info.address)
            if (
                ws is None
                or ws.last_seen != w.info.last_seen
                or ws.nbytes != w.info.reading.managed_total
            ):
                continue  # a heartbeat or a task arrived after the poll: not comparable
            ms = ws.memory
            want = {
                n.WORKER_PROCESS_BYTES: ms.process,
                n.WORKER_MANAGED_BYTES: ms.managed,
                n.WORKER_UNMANAGED_BYTES: ms.unmanaged_old,
                n.WORKER_UNMANAGED_RECENT_BYTES: ms.unmanaged_recent,
                n.WORKER_SPILLED_BYTES: ms.spilled,
            }
            got = {m: by_worker_name(samples, m)[str(ws.name)] for m in BREAKDOWN}
            assert got == want, ws.address
            compared += 1
        await asyncio.sleep(0.13)

    samples = parse((await live.get("/metrics"))[1])
    assert (
        by_worker_name(samples, n.WORKER_MANAGED_BYTES)[str(live.scheduler.workers[a].name)]
        >= 40 * MiB
    )
    assert scalar(samples, n.SCHEDULER_WORKERS) == 2
    assert scalar(samples, n.SCHEDULER_UP) == 1
    del held


async def test_landing_page_and_probes(live: Cluster) -> None:
    status, page = await live.get("/")
    assert status == 200
    assert live.scheduler.address in page and "<b>up</b>" in page
    for ws in live.scheduler.workers.values():
        assert ws.address in page
    assert await live.get("/healthz") == (200, "ok\n")
    assert await live.get("/readyz") == (200, "ready\n")


async def test_file_sd_names_the_exporter(live: Cluster) -> None:
    groups = json.loads(live.file_sd.read_text())
    assert groups == [
        {"targets": [f"127.0.0.1:{live.exporter.server.port}"], "labels": {"cluster": "hpc-test"}}
    ]
    assert live.file_sd.stat().st_mode & 0o777 == 0o644


def _leak_until_killed() -> None:
    """Allocates 8 MiB every 50 ms (written: resident) until the worker's nanny kills it."""
    import time

    held = []
    while True:
        held.append(bytearray(b"\x01" * 8 * 2**20))
        time.sleep(0.05)


async def test_a_nanny_memory_kill_is_counted_inside_the_scheduler(live: Cluster) -> None:
    """The events source reads the scheduler's log directly: no comm, the same counts."""
    (address, ws), *_ = live.scheduler.workers.items()
    name = str(ws.name)

    async def restarts() -> dict[str, float]:
        status, text = await live.get("/metrics")
        assert status == 200
        samples = parse(text)
        return {
            dict(k[1])[n.LABEL_WORKER_NAME]: v
            for k, v in samples.items()
            if k[0] == n.WORKER_MEMORY_RESTARTS_TOTAL
        }

    deadline = time.monotonic() + 30
    while name not in await restarts():
        assert time.monotonic() < deadline, "no restart series for the worker"
        await asyncio.sleep(0.2)
    assert (await restarts())[name] == 0
    future = live.client.submit(_leak_until_killed, workers=[address], pure=False)
    deadline = time.monotonic() + 60
    while (await restarts()).get(name, 0) < 1:
        assert time.monotonic() < deadline, "the kill was not counted"
        await asyncio.sleep(0.2)
    await live.client.cancel([future])  # restricted to the dead address: it cannot run again
    assert (await restarts())[name] == 1


async def test_dask_jobqueue_scheduler_options(tmp_path: Path) -> None:
    """docs/hpc.md's recipe with dask-jobqueue's own SLURMCluster: its scheduler starts in
    this process with the preload. (No job is submitted: there is no batch system here; the
    workers' side is the same as any worker's, covered above.)"""
    from dask_jobqueue import SLURMCluster

    file_sd = tmp_path / "sd.json"
    async with SLURMCluster(
        cores=1,
        memory="1GB",
        asynchronous=True,
        scheduler_options={
            "host": "127.0.0.1",
            "port": 0,
            "dashboard_address": "127.0.0.1:0",
            "preload": [PRELOAD],
            "preload_argv": [
                "--memory-exporter-port", "0",
                "--memory-exporter-host", "127.0.0.1",
                "--memory-exporter-file-sd", str(file_sd),
            ],
        },
    ) as cluster:  # fmt: skip
        exporter = preload.running(cluster.scheduler)
        assert exporter is not None
        assert json.loads(file_sd.read_text()) == [{"targets": [exporter.target]}]
        deadline = time.monotonic() + 30
        while True:  # until the first poll is published, as /readyz would say
            async with (
                aiohttp.ClientSession() as session,
                session.get(exporter.url + "/metrics") as r,
            ):
                samples = parse(await r.text())
            if scalar(samples, n.EXPORTER_POLLS_TOTAL) >= 1:
                break
            assert time.monotonic() < deadline, "no poll published in 30 s"
            await asyncio.sleep(0.1)
        assert scalar(samples, n.SCHEDULER_UP) == 1
        assert scalar(samples, n.SCHEDULER_WORKERS) == 0
    assert not file_sd.exists()


# --- bare schedulers: start-up failures and teardown ------------------------------------------


def _scheduler(*argv: str) -> Scheduler:
    return Scheduler(
        host="127.0.0.1",
        port=0,
        dashboard_address="127.0.0.1:0",
        preload=[PRELOAD],
        preload_argv=list(argv),
    )


def _refused(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def _errors(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_teardown_closes_the_port_and_removes_the_file(tmp_path: Path) -> None:
    file_sd = tmp_path / "sd.json"
    async with _scheduler(
        "--memory-exporter-port", "0", "--memory-exporter-host", "127.0.0.1",
        "--memory-exporter-file-sd", str(file_sd),
    ) as s:  # fmt: skip
        exporter = preload.running(s)
        assert exporter is not None
        port = exporter.server.port
        assert json.loads(file_sd.read_text()) == [{"targets": [f"127.0.0.1:{port}"]}]
        assert not _refused(port)
    assert preload.running(s) is None
    assert not file_sd.exists()
    assert _refused(port)


async def test_port_in_use_is_one_line_and_the_scheduler_runs_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with caplog.at_level(logging.INFO):
            async with _scheduler(
                "--memory-exporter-port", str(port), "--memory-exporter-host", "127.0.0.1"
            ) as s:
                assert preload.running(s) is None
                # The scheduler itself serves: a client connects and sees it.
                async with Client(s.address, asynchronous=True) as client:
                    assert (await client.scheduler.identity())["address"] == s.address
    errors = _errors(caplog)
    assert len(errors) == 1, [r.getMessage() for r in errors]
    message = errors[0].getMessage()
    assert f"--memory-exporter-port {port}" in message and "already in use" in message
    assert "\n" not in message and errors[0].exc_info is None
    assert not any(r.exc_info for r in caplog.records)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--memory-exporter-port", "http"], "'http' is not a valid integer"),
        (["--memory-exporter-port", "70000"], "70000 is not in the range"),
        (["--memory-exporter-prot", "9787"], "No such option '--memory-exporter-prot'"),
    ],
)
async def test_bad_preload_argv_is_one_line(
    caplog: pytest.LogCaptureFixture, argv: list[str], expected: str
) -> None:
    """LocalCluster and dask-jobqueue hand ``preload_argv`` over unchecked: the preload
    logs one line and the scheduler runs on (Dask would log a traceback for an exception)."""
    with caplog.at_level(logging.INFO):
        async with _scheduler(*argv) as s:
            assert preload.running(s) is None
            assert s.status.name == "running"
    errors = _errors(caplog)
    assert len(errors) == 1, [r.getMessage() for r in errors]
    assert expected in errors[0].getMessage()
    assert errors[0].getMessage().startswith("dask-memory-exporter preload: ")
    assert not any(r.exc_info for r in caplog.records)
