"""The Poller: pacing, per-source status, errors and backoff, and how sources' results join.

The sources here are stand-ins that raise, hang or return what a test sets: the Poller's
bookkeeping is what is tested. The local stand-in returns a ``LocalReading`` converted by the
real ``process.source_result``. Real unreachable, hung and restarting schedulers are in
tests/integration/test_faults.py, real worker processes in tests/integration/test_sidecar.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any

import pytest

from dask_memory_exporter import names as n
from dask_memory_exporter.collector import Exposition
from dask_memory_exporter.memory import MemoryModel, WorkerReading
from dask_memory_exporter.names import Metric, worker_gauge
from dask_memory_exporter.process import LocalProcess, LocalReading, source_result
from dask_memory_exporter.snapshot import Poller, Snapshot
from dask_memory_exporter.source import SourceError, SourceResult, WorkerInfo
from tests.support.live import parse

MiB = 2**20
A, B = "tcp://10.0.0.5:40001", "tcp://10.0.0.7:40001"
TASKS = worker_gauge("dask_memory_worker_poller_test_tasks", "A plug-in family of the test.")


def info(address: str, process: int = 100 * MiB) -> WorkerInfo:
    return WorkerInfo(
        address=address,
        name=address,
        host=address.split("://")[1].rsplit(":", 1)[0],
        nthreads=1,
        memory_limit=300 * MiB,
        status="running",
        last_seen=1000.0,
        nanny=None,
        reading=WorkerReading(process, 10 * MiB, 0, 0, 1000.0),
    )


class Scheduler:
    """A roster stand-in: returns its workers, raises while ``fail``, hangs while ``hang``."""

    name = n.SOURCE_SCHEDULER
    roster = True
    families: tuple[Metric, ...] = (TASKS,)
    reasons = ("refused",)

    def __init__(self, *ws: WorkerInfo, skipped: int = 0) -> None:
        self.workers = {w.address: w for w in ws}
        self.skipped = skipped
        self.fail = False
        self.hang = False
        self.calls = 0

    async def fetch(self, workers: Mapping[str, WorkerInfo]) -> SourceResult:
        self.calls += 1
        if self.hang:
            await asyncio.Event().wait()
        if self.fail:
            raise SourceError("refused", "connection refused")
        values = {a: {TASKS: float(i + 1)} for i, a in enumerate(self.workers)}
        return SourceResult(workers=self.workers, skipped=self.skipped, values=values)

    async def close(self) -> None:
        pass


class Local:
    """A local-process stand-in: the reading a test sets, through the real conversion."""

    name = n.SOURCE_LOCAL
    roster = False
    families: tuple[Metric, ...] = ()
    reasons = ("unreadable",)

    def __init__(self, *procs: LocalProcess, ok: bool = True, denied: int = 0) -> None:
        self.reading = LocalReading(tuple(procs), ok=ok, denied=denied)
        self.seen: Mapping[str, WorkerInfo] | None = None

    def set(self, *procs: LocalProcess, ok: bool = True) -> None:
        self.reading = LocalReading(tuple(procs), ok=ok)

    async def fetch(self, workers: Mapping[str, WorkerInfo]) -> SourceResult:
        self.seen = workers
        return source_result(self.reading)

    async def close(self) -> None:
        pass


def proc(pid: int, rss: int | None, address: str | None = None, name: str | None = None) -> Any:
    return LocalProcess(pid=pid, start_time=1.0, rss=rss, address=address, name=name)


async def _publish(s: Snapshot) -> None:
    pass


def poller(*sources: Any, **kw: Any) -> Poller:
    return Poller(list(sources), MemoryModel(30), {"spill": 0.7}, _publish, **kw)


def status(snap: Snapshot) -> dict[str, tuple[bool, int]]:
    return {s.name: (s.success, s.errors_total) for s in snap.sources}


# --- pacing -----------------------------------------------------------------------------
@pytest.mark.parametrize(("workers", "delay"), [(0, 0.5), (10, 0.5), (11, 1), (49, 1), (199, 2),
                                                (1000, 6), (5000, 26)])  # fmt: skip
async def test_interval_follows_heartbeat(workers: int, delay: float) -> None:
    p = poller(Scheduler(skipped=workers))  # the size the scheduler reported
    await p.poll_once()
    assert p.next_delay() == delay


async def test_min_interval_wins_when_slower() -> None:
    p = poller(Scheduler(), min_interval=15)
    await p.poll_once()
    assert p.next_delay() == 15


async def test_backoff_grows_to_the_cap_and_resets() -> None:
    src = Scheduler(info(A))
    src.fail = True
    p = poller(src, max_backoff=8)
    delays = []
    for _ in range(8):
        p.roster.retry_at = 0  # type: ignore[union-attr]  # don't sleep: retry at once
        snap = await p.poll_once()
        delays.append(p.next_delay())
    assert not snap.scheduler_up and status(snap) == {"scheduler": (False, 8)}
    assert delays[0] < delays[2] < delays[3]
    assert max(delays) <= 8 and delays[-1] >= 8 * 0.8 - 0.1
    src.fail = False
    p.roster.retry_at = 0  # type: ignore[union-attr]
    snap = await p.poll_once()
    assert snap.scheduler_up and snap.polled and p.next_delay() == 0.5
    assert status(snap) == {"scheduler": (True, 8)}  # a counter: errors stay counted


async def test_a_source_backing_off_is_not_retried_early() -> None:
    src = Scheduler(info(A))
    src.fail = True
    p = poller(src, Local(), max_backoff=30)
    await p.poll_once()
    await p.poll_once()
    assert src.calls == 1  # the second poll fell within the backoff
    assert p.next_delay() == 0.5  # the local source keeps the heartbeat's pace


# --- scheduler_up is the roster's own state ----------------------------------------------------
async def test_a_failing_local_read_never_sets_scheduler_down() -> None:
    local = Local(proc(21, 400 * MiB, A))
    p = poller(Scheduler(info(A)), local)
    await p.poll_once()
    local.set(ok=False)
    snap = await p.poll_once()
    assert snap.scheduler_up
    assert status(snap) == {"scheduler": (True, 0), "local": (False, 1)}
    (w,) = snap.workers
    assert w.rss is None and w.memory.process == 100 * MiB  # back to the heartbeat's figure


async def test_a_fetch_in_flight_keeps_the_last_state() -> None:
    """A hung scheduler fetch is left running; each poll still publishes fresh local RSS,
    and the scheduler is neither up nor down until the fetch completes."""
    sched = Scheduler(info(A))
    local = Local(proc(21, 400 * MiB, A))
    p = poller(sched, local)
    snap = await p.poll_once()
    assert snap.scheduler_up
    sched.hang = True
    p.roster.retry_at = 0  # type: ignore[union-attr]
    for rss in (500, 600):
        local.set(proc(21, rss * MiB, A))
        started = time.monotonic()
        snap = await p.poll_once()
        assert time.monotonic() - started < 2.0
        assert snap.scheduler_up
        assert [w.memory.process for w in snap.workers] == [rss * MiB]
    assert sched.calls == 2  # one fetch in flight, not one per poll
    await p.roster.cancel()  # type: ignore[union-attr]


# --- modes --------------------------------------------------------------------------------------
async def test_mode_both_overrides_local_workers_only() -> None:
    local = Local(proc(21, 400 * MiB, A))
    snap = await poller(Scheduler(info(A), info(B)), local).poll_once()
    by = {w.info.address: w for w in snap.workers}
    assert set(by) == {A, B}
    assert by[A].rss == by[A].memory.process == 400 * MiB
    # the fresh RSS lands in unmanaged recent; old is the heartbeat's sample (100 - 10 MiB)
    assert (by[A].memory.unmanaged_old, by[A].memory.unmanaged_recent) == (90 * MiB, 300 * MiB)
    assert by[B].rss is None and by[B].memory.process == 100 * MiB
    assert status(snap) == {"scheduler": (True, 0), "local": (True, 0)}


async def test_mode_local_exports_matched_workers_and_unreported_processes() -> None:
    local = Local(
        proc(21, 400 * MiB, A),
        proc(22, 90 * MiB, name="w-new"),
        proc(23, 80 * MiB),
        proc(24, None),  # RSS denied and unmatched: nothing to show
        denied=1,
    )
    p = poller(Scheduler(info(A), info(B)), local, local_workers_only=True)
    snap = await p.poll_once()
    assert [w.info.address for w in snap.workers] == [A]
    assert [(q.name, q.rss) for q in snap.local_only] == [("w-new", 90 * MiB), ("pid:23", 80 * MiB)]
    assert local.seen is not None and set(local.seen) == {A, B}
    assert snap.scheduler_workers == 2  # what the scheduler reported, not what is exported
    assert snap.source_gauges == {n.EXPORTER_LOCAL_UNREADABLE_PROCESSES: 1}


async def test_scheduler_down_keeps_local_rss_live() -> None:
    sched = Scheduler(info(A))
    local = Local(proc(21, 400 * MiB, A))
    p = poller(sched, local, local_workers_only=True)
    await p.poll_once()
    sched.fail = True
    local.set(proc(21, 700 * MiB, A))
    snap = await p.poll_once()
    assert not snap.scheduler_up and status(snap)["scheduler"] == (False, 1)
    (w,) = snap.workers
    assert (w.info.address, w.rss, w.memory.process) == (A, 700 * MiB, 700 * MiB)
    assert local.seen is not None and set(local.seen) == {A}  # matched against the last view


async def test_local_only_without_a_scheduler() -> None:
    p = poller(Local(proc(21, 400 * MiB, name="w")), local_workers_only=True)
    snap = await p.poll_once()
    assert snap.workers == () and [(q.name, q.rss) for q in snap.local_only] == [("w", 400 * MiB)]
    assert not snap.has_scheduler and status(snap) == {"local": (True, 0)}
    assert p.next_delay() == 0.5
    samples = parse(Exposition.render(snap).text.decode())
    worker_series = {k for k in samples if k[0].startswith("dask_memory_worker_")}
    assert worker_series == {(n.WORKER_RSS_BYTES, (("worker", ""), ("worker_name", "w")))}
    assert (n.SCHEDULER_UP, ()) not in samples


# --- plug-in families ----------------------------------------------------------------------------
async def test_plugin_family_values_reach_the_exposition() -> None:
    sched = Scheduler(info(A), info(B))
    p = poller(sched)
    snap = await p.poll_once()
    assert snap.families == (TASKS,)
    samples = parse(Exposition.render(snap, process_metrics=False).text.decode())
    assert {dict(k[1])["worker"]: v for k, v in samples.items() if k[0] == TASKS} == {A: 1, B: 2}
    # While the scheduler is down, the last values stand with the last workers.
    sched.fail = True
    snap = await p.poll_once()
    assert not snap.scheduler_up and {w.values[TASKS] for w in snap.workers} == {1, 2}


def test_two_roster_sources_are_refused() -> None:
    with pytest.raises(ValueError, match="roster"):
        poller(Scheduler(), Scheduler())


# --- errors by cause, and stale workers ---------------------------------------------------------
async def test_errors_are_counted_by_declared_reason() -> None:
    class Odd(Scheduler):
        exc: BaseException = SourceError("refused", "x")

        async def fetch(self, workers: Mapping[str, WorkerInfo]) -> SourceResult:
            raise self.exc

    src = Odd()
    p = poller(src)
    for exc in (SourceError("refused", "r"), asyncio.TimeoutError(), KeyError("bug"),
                SourceError("undeclared", "u")):  # fmt: skip
        src.exc = exc
        p.roster.retry_at = 0  # type: ignore[union-attr]
        snap = await p.poll_once()
    (s,) = snap.sources
    assert dict(s.errors) == {"refused": 1, "timeout": 1, "other": 2}


async def test_workers_are_dropped_once_the_roster_is_stale() -> None:
    """Within stale_after the last workers stand (flagged by scheduler_up 0); after it they
    go, and the processes beside the exporter fall back to RSS-only series."""
    sched = Scheduler(info(A))
    local = Local(proc(21, 400 * MiB, A, name="w"))
    p = poller(sched, local, stale_after=0.3)
    await p.poll_once()
    sched.fail = True
    snap = await p.poll_once()
    assert not snap.scheduler_up and [w.info.address for w in snap.workers] == [A]
    await asyncio.sleep(0.35)
    local.set(proc(21, 400 * MiB, None, name="w"))  # unmatched against an empty roster
    snap = await p.poll_once()
    assert snap.workers == () and [q.name for q in snap.local_only] == ["w"]
    assert local.seen == {}


def test_default_stale_limit_is_five_heartbeats_and_at_least_10s() -> None:
    p = poller(Scheduler())
    assert p.stale_limit() == 10
    p.snapshot = Snapshot(time=0, scheduler_workers=1000)
    assert p.stale_limit() == 30  # 5 x 6 s


async def test_run_survives_an_error_past_the_sources(caplog: pytest.LogCaptureFixture) -> None:
    """A publish (render) that raises does not end the poller task: it is logged once and the
    next polls publish as usual."""
    published: list[Snapshot] = []
    failures = 2

    async def publish(s: Snapshot) -> None:
        nonlocal failures
        if failures:
            failures -= 1
            raise ValueError("render broke")
        published.append(s)

    poller = Poller([Scheduler(info(A))], MemoryModel(30.0), {}, publish, min_interval=0.0)
    task = asyncio.create_task(poller.run())
    try:
        deadline = time.monotonic() + 30
        while len(published) < 2:
            assert time.monotonic() < deadline, "the poller stopped publishing"
            await asyncio.sleep(0.05)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert published[-1].polls_total >= 3
    logged = [r for r in caplog.records if "poll failed" in r.getMessage()]
    assert len(logged) == 1
