"""Sidecar mode against real worker processes: RSS read from /proc while the GIL is held.

A LocalCluster of two worker processes (spawned by in-process nannies, so same UID: matched by
listening port), and a separate scheduler process with two ``dask worker`` command lines
(matched by command line and process tree, with socket access denied as it is for a sidecar
of another UID; the tests run as root, so that denial is the one thing simulated here).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import pytest_asyncio
from distributed import Client, LocalCluster

from benchmarks.blocked_event_loop import hold_gil_and_grow
from dask_memory_exporter import names as n
from dask_memory_exporter.demo import leak_step, start_cluster, wait_for_workers
from dask_memory_exporter.process import LocalProcessSource, use_proc_root
from dask_memory_exporter.scheduler import decode_identity
from tests.support.live import Samples, free_port, scalar, serve_exporter

pytestmark = pytest.mark.asyncio(loop_scope="module")

MiB = 2**20
LIMIT = 2048 * MiB  # far above what the stall allocates: the nanny must not step in
BIN = Path(sys.executable).parent


def by_worker(samples: Samples, metric: str) -> dict[str, float]:
    """{worker address: value} of one per-worker family."""
    return {dict(k[1])["worker"]: v for k, v in samples.items() if k[0] == metric}


def by_labels(samples: Samples, metric: str) -> dict[tuple[str, str], float]:
    """{(worker, worker_name): value} of one per-worker family."""
    out = {}
    for (name, labels), v in samples.items():
        if name == metric:
            d = dict(labels)
            out[(d["worker"], d["worker_name"])] = v
    return out


def source_success(samples: Samples, source: str) -> float | None:
    return samples.get((n.EXPORTER_SOURCE_SUCCESS, (("source", source),)))


# --- a LocalCluster, mode both -----------------------------------------------------------------
class Cluster:
    def __init__(self, cluster: LocalCluster, client: Client) -> None:
        self.cluster = cluster
        self.client = client

    @property
    def scheduler(self) -> Any:
        return self.cluster.scheduler

    async def pids(self) -> dict[str, int]:
        return dict(await self.client.run(os.getpid))


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def local_cluster() -> AsyncIterator[Cluster]:
    cluster = await start_cluster(("a", "b"), LIMIT)
    try:
        await wait_for_workers(cluster, 2)
        client = await Client(cluster, asynchronous=True)
        yield Cluster(cluster, client)
        await client.close()
    finally:
        await cluster.close()  # type: ignore[misc]


async def test_gil_stall_rss_stays_live(local_cluster: Cluster) -> None:
    """A task holds the GIL for >= 10 s while allocating: every scrape answers within 1 s, the
    direct RSS grows past the last heartbeat's figure, and heartbeat age climbs."""
    c = local_cluster
    async with serve_exporter(scheduler=c.cluster.scheduler_address, mode="both") as ex:
        s = await ex.wait_for(
            lambda s: len(by_worker(s, n.WORKER_RSS_BYTES)) == 2, what="both workers' RSS"
        )
        assert source_success(s, n.SOURCE_LOCAL) == 1
        addr = next(a for a, ws in c.scheduler.workers.items() if ws.name == "a")
        fut = c.client.submit(
            hold_gil_and_grow, 12.0, 6 * MiB, workers=[addr], pure=False, allow_other_workers=False
        )
        s = await ex.wait_for(
            lambda s: by_worker(s, n.WORKER_HEARTBEAT_AGE_SECONDS).get(addr, 0) > 1.5,
            timeout=30,
            what="the worker's heartbeats to stop",
        )
        first_rss = by_worker(s, n.WORKER_RSS_BYTES)[addr]
        rss, ages, latencies, beyond_heartbeat = [first_rss], [], [], []
        deadline = time.monotonic() + 30
        while not fut.done() and time.monotonic() < deadline:
            started = time.monotonic()
            s = await ex.scrape()
            latencies.append(time.monotonic() - started)
            age = by_worker(s, n.WORKER_HEARTBEAT_AGE_SECONDS)[addr]
            if age < 1.0:
                break  # heartbeats are back: the stall is over
            ages.append(age)
            rss.append(by_worker(s, n.WORKER_RSS_BYTES)[addr])
            heartbeat = c.scheduler.workers[addr].metrics["memory"]
            beyond_heartbeat.append(rss[-1] - heartbeat)
            # In mode both the direct RSS is the worker's process memory.
            assert by_worker(s, n.WORKER_PROCESS_BYTES)[addr] == rss[-1]
            await asyncio.sleep(0.25)
        assert await fut > 0
    print(
        f"stall: {len(latencies)} scrapes, max latency {max(latencies) * 1000:.0f} ms, "
        f"age up to {max(ages):.1f} s, rss {first_rss / MiB:.0f} -> {max(rss) / MiB:.0f} MiB, "
        f"beyond heartbeat up to {max(beyond_heartbeat) / MiB:.0f} MiB"
    )
    assert max(latencies) < 1.0
    assert max(ages) > 6.0, ages
    assert max(rss) - first_rss > 50 * MiB, rss
    assert max(beyond_heartbeat) > 50 * MiB


async def test_two_workers_matched_to_their_own_processes(local_cluster: Cluster) -> None:
    """Mode both: each worker's RSS is its own process's (one of them made 150 MiB bigger)."""
    c = local_cluster
    addr_a = next(a for a, ws in c.scheduler.workers.items() if ws.name == "a")
    await c.client.run(leak_step, 150 * MiB, LIMIT, workers=[addr_a])
    pids = await c.pids()
    async with serve_exporter(scheduler=c.cluster.scheduler_address, mode="both") as ex:
        s = await ex.wait_for(
            lambda s: set(by_worker(s, n.WORKER_RSS_BYTES)) == set(pids), what="both matched"
        )
        rss = by_worker(s, n.WORKER_RSS_BYTES)
        for addr, pid in pids.items():
            actual = psutil.Process(pid).memory_info().rss
            assert abs(rss[addr] - actual) < 0.1 * actual, (addr, rss[addr], actual)
        (addr_b,) = set(pids) - {addr_a}
        assert rss[addr_a] > rss[addr_b] + 100 * MiB
        assert (await ex.get("/readyz"))[0] == 200


async def test_vanished_process_is_skipped(
    local_cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker process that exits between the scan and the RSS read is left out, silently."""
    c = local_cluster
    pids = await c.pids()
    addr_b = next(a for a, ws in c.scheduler.workers.items() if ws.name == "b")
    victim = pids[addr_b]

    class KillsMidRead(LocalProcessSource):
        def _rss(self, proc: psutil.Process) -> int:
            if proc.pid == victim:
                os.kill(victim, signal.SIGKILL)
                with_deadline = time.monotonic() + 10
                while psutil.pid_exists(victim) and psutil.Process(victim).status() != "zombie":
                    assert time.monotonic() < with_deadline
                    time.sleep(0.01)
            return super()._rss(proc)

    workers = decode_identity(c.scheduler.identity(n_workers=-1)).workers
    source = KillsMidRead()
    with caplog.at_level(logging.DEBUG, logger="dask_memory_exporter"):
        reading = await asyncio.to_thread(source.read, workers)
    assert reading.ok
    assert set(reading.matched) == set(workers) - {addr_b}
    assert all(p.pid != victim for p in reading.processes)
    mine = [r for r in caplog.records if r.name.startswith("dask_memory_exporter")]
    assert not [r for r in mine if r.levelno >= logging.WARNING or r.exc_info]


async def test_nanny_restart_is_rematched(local_cluster: Cluster) -> None:
    """The nanny restarts a killed worker under a new pid and address: matched afresh."""
    c = local_cluster
    async with serve_exporter(scheduler=c.cluster.scheduler_address, mode="both") as ex:
        await ex.wait_for(lambda s: len(by_worker(s, n.WORKER_RSS_BYTES)) == 2, what="two")
        pids = await c.pids()
        addr_b = next(a for a, ws in c.scheduler.workers.items() if ws.name == "b")
        os.kill(pids[addr_b], signal.SIGKILL)

        def restarted(s: Samples) -> bool:
            rss = by_labels(s, n.WORKER_RSS_BYTES)
            new = [w for (w, name) in rss if name == "b" and w and w != addr_b]
            return bool(new) and addr_b not in {w for w, _ in rss}

        s = await ex.wait_for(restarted, timeout=40, what="worker b back under a new address")
        new_addr = next(w for (w, name) in by_labels(s, n.WORKER_RSS_BYTES) if name == "b")
        await wait_for_workers(c.cluster, 2)
        new_pid = (await c.pids())[new_addr]
        assert new_pid != pids[addr_b]
        actual = psutil.Process(new_pid).memory_info().rss
        assert abs(by_worker(s, n.WORKER_RSS_BYTES)[new_addr] - actual) < 0.2 * actual


# --- `dask worker` command lines, sockets denied, scheduler killed --------------------------
class CliCluster:
    def __init__(self, address: str, scheduler: subprocess.Popen[bytes]) -> None:
        self.address = address
        self.scheduler = scheduler
        self.workers: list[subprocess.Popen[bytes]] = []


def _dask(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [str(BIN / "dask"), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


@pytest.fixture(scope="module")
def cli_cluster() -> Iterator[CliCluster]:
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    sched = _dask("scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard")
    cli = CliCluster(address, sched)
    common = ("--host", "127.0.0.1", "--no-dashboard", "--death-timeout", "60")
    cli.workers.append(
        _dask(
            "worker",
            address,
            "--name",
            "named",
            "--nthreads",
            "1",
            "--memory-limit",
            "300MiB",
            *common,
        )
    )
    cli.workers.append(
        _dask("worker", address, "--nthreads", "2", "--memory-limit", "350MiB", *common)
    )
    try:
        yield cli
    finally:
        for p in [*cli.workers, sched]:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGCONT)
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=30)


def _no_sockets(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a sidecar with another UID gets for another process's sockets."""

    def denied(self: LocalProcessSource, proc: psutil.Process) -> Any:
        raise psutil.AccessDenied(proc.pid)

    monkeypatch.setattr(LocalProcessSource, "_listening", denied)


async def test_cmdline_matching_and_scheduler_down(
    cli_cluster: CliCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without sockets, `dask worker` options tie each child to its scheduler entry; while the
    scheduler hangs, the RSS stays exported and live with scheduler_up 0.

    The scheduler is frozen (SIGSTOP), not killed: on a broken scheduler connection Dask
    workers close themselves and ``dask worker`` exits, so a hung or unreachable scheduler
    is the case where workers outlive it.
    """
    _no_sockets(monkeypatch)
    async with serve_exporter(
        scheduler=cli_cluster.address, mode="both", max_backoff=1.0, timeout=2.0
    ) as ex:
        s = await ex.wait_for(
            lambda s: len([w for w, _ in by_labels(s, n.WORKER_RSS_BYTES) if w]) == 2,
            timeout=40,
            what="both dask worker processes matched",
        )
        rss = by_labels(s, n.WORKER_RSS_BYTES)
        names = {name for _, name in rss}
        assert "named" in names
        assert all(w.startswith("tcp://127.0.0.1:") for w, _ in rss)
        # the unnamed worker is named after its address
        assert any(w == name for w, name in rss)
        assert scalar(s, n.SCHEDULER_UP) == 1

        cli_cluster.scheduler.send_signal(signal.SIGSTOP)
        s = await ex.wait_for(lambda s: scalar(s, n.SCHEDULER_UP) == 0, what="scheduler down")
        polls = scalar(s, n.EXPORTER_POLLS_TOTAL) or 0
        s = await ex.wait_for(
            lambda s: (scalar(s, n.EXPORTER_POLLS_TOTAL) or 0) >= polls + 4,
            timeout=10,
            what="local polls to go on at the heartbeat's pace while the scheduler is down",
        )
        assert set(by_labels(s, n.WORKER_RSS_BYTES)) == set(rss)
        assert source_success(s, n.SOURCE_LOCAL) == 1
        assert source_success(s, n.SOURCE_SCHEDULER) == 0
        assert (await ex.get("/readyz"))[0] == 503  # mode both: ready follows the scheduler

    # A worker sidecar (mode local) never calls the scheduler, hung or not: RSS only, named
    # from the command line, ready on the local source, no scheduler series at all.
    async with serve_exporter(
        scheduler=cli_cluster.address, mode="local", max_backoff=1.0, timeout=2.0
    ) as ex:
        s = await ex.wait_for(
            lambda s: len(by_labels(s, n.WORKER_RSS_BYTES)) == 2, what="RSS-only series"
        )
        rss = by_labels(s, n.WORKER_RSS_BYTES)
        assert {w for w, _ in rss} == {""}
        names = {name for _, name in rss}
        assert "named" in names and any(name.startswith("pid:") for name in names)
        assert scalar(s, n.SCHEDULER_UP) is None
        assert source_success(s, n.SOURCE_SCHEDULER) is None
        assert (await ex.get("/readyz"))[0] == 200


async def test_permission_denied_warns_once_and_falls_back(
    local_cluster: Cluster, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """RSS reads refused (simulated: the tests run as root) give one warning per process, and
    the workers keep their heartbeat figures; an unreadable process table (a procfs root that
    does not exist) gives one warning and local success 0."""

    def denied(self: LocalProcessSource, proc: psutil.Process) -> int:
        raise psutil.AccessDenied(proc.pid)

    monkeypatch.setattr(LocalProcessSource, "_rss", denied)
    c = local_cluster
    await wait_for_workers(c.cluster, 2)
    with caplog.at_level(logging.INFO, logger="dask_memory_exporter"):
        async with serve_exporter(scheduler=c.cluster.scheduler_address, mode="both") as ex:
            s = await ex.wait_for(
                lambda s: len(by_worker(s, n.WORKER_PROCESS_BYTES)) == 2, what="two workers"
            )
            polls = scalar(s, n.EXPORTER_POLLS_TOTAL) or 0
            s = await ex.wait_for(
                lambda s: (scalar(s, n.EXPORTER_POLLS_TOTAL) or 0) >= polls + 3, what="3 polls"
            )
            assert by_worker(s, n.WORKER_RSS_BYTES) == {}
            assert source_success(s, n.SOURCE_LOCAL) == 1
    warnings = [
        r for r in caplog.records if r.name.startswith("dask_memory_exporter") and r.levelno >= 30
    ]
    assert len(warnings) == 2 and all("permission denied" in r.getMessage() for r in warnings)
    assert not any(r.exc_info for r in caplog.records)

    caplog.clear()
    monkeypatch.setattr(psutil, "PROCFS_PATH", psutil.PROCFS_PATH)  # restored afterwards
    use_proc_root("/nonexistent/proc")
    source = LocalProcessSource("/nonexistent/proc")
    with caplog.at_level(logging.INFO, logger="dask_memory_exporter"):
        readings = [source.read({}) for _ in range(3)]
    assert [r.ok for r in readings] == [False] * 3
    warnings = [r for r in caplog.records if r.levelno >= 30]
    assert len(warnings) == 1 and "/nonexistent/proc" in warnings[0].getMessage()


# --- mode local: no scheduler call, the event-loop probe ------------------------------------
async def test_worker_sidecar_never_calls_the_scheduler() -> None:
    """A local-mode sidecar given a scheduler address opens no connection to it, poll after
    poll: N sidecars cost the scheduler nothing (benchmarks/sidecar_cost.py measures it).

    The "scheduler" is a plain TCP listener counting connections, so even the preflight
    connect would show."""
    accepted = 0

    def count(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        writer.close()

    server = await asyncio.start_server(count, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with serve_exporter(scheduler=f"tcp://127.0.0.1:{port}", mode="local") as ex:
            await ex.wait_for(
                lambda s: (scalar(s, n.EXPORTER_POLLS_TOTAL) or 0) >= 5, what="five polls"
            )
    finally:
        server.close()
        await server.wait_closed()
    assert accepted == 0


@pytest.fixture(scope="module")
def probed_worker() -> Iterator[tuple[str, str]]:
    """A scheduler of its own with one `dask worker --name probed` serving its dashboard on a
    known port: the one worker process a local sidecar of that scheduler finds."""
    port, dash = free_port(), free_port()
    address = f"tcp://127.0.0.1:{port}"
    # The worker imports the blocking task from benchmarks/ (pickled by reference).
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    procs = [
        subprocess.Popen(
            [str(BIN / "dask"), *args], env=env, start_new_session=True,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        for args in (
            ("scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"),
            ("worker", address, "--name", "probed", "--nthreads", "1", "--host", "127.0.0.1",
             "--dashboard-address", f"127.0.0.1:{dash}", "--death-timeout", "60"),
        )
    ]  # fmt: skip
    try:
        yield address, f"http://127.0.0.1:{dash}/health"
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=30)


async def test_probe_shows_a_blocked_event_loop_within_seconds(
    probed_worker: tuple[str, str],
) -> None:
    """The sidecar's probe of the worker's /health answers in milliseconds, then climbs past
    3 s while a task holds the GIL, with the RSS still exported under the worker's name."""
    address, url = probed_worker
    async with serve_exporter(scheduler=address, mode="local", worker_probe_url=url) as ex:
        name = "dask_memory_worker_event_loop_probe_seconds"
        s = await ex.wait_for(
            lambda s: ("", "probed") in by_labels(s, name), timeout=60, what="a probe answer"
        )
        assert by_labels(s, name)[("", "probed")] < 1.0
        assert ("", "probed") in by_labels(s, n.WORKER_RSS_BYTES)
        _, _, page = await ex.get("/")
        assert b"Worker processes beside the exporter" in page and b"event loop probe" in page
        async with Client(address, asynchronous=True) as client:
            fut = client.submit(hold_gil_and_grow, 10.0, 1 * MiB, pure=False)
            started = time.monotonic()
            s = await ex.wait_for(
                lambda s: by_labels(s, name).get(("", "probed"), 0) > 3.0,
                timeout=60,
                what="the probe to show the blocked loop",
            )
            seen_after = time.monotonic() - started
            await fut
        s = await ex.wait_for(
            lambda s: by_labels(s, name).get(("", "probed"), 99) < 1.0,
            timeout=60,
            what="the probe to recover",
        )
    print(f"probe above 3 s {seen_after:.1f} s after the task was submitted")
