"""The immutable Snapshot of one poll, and the Poller that makes one per heartbeat interval.

Data flows one way: sources -> memory model -> Snapshot -> collector -> HTTP. The Poller is
the only place that awaits a source and the only place with a timer; it swaps in a new
Snapshot atomically after each attempt, successful or not, so HTTP handlers only ever read
a finished Snapshot and a slow or dead scheduler never blocks a scrape. It does not render
metrics (``collector.py``) nor serve them (``app.py``).

In sidecar mode (``local`` or ``both``) each poll also reads the RSS of the worker processes
beside the exporter (``process.LocalProcessSource``, in a thread: it does /proc I/O) and
puts it into the matched workers' process memory. That read keeps the heartbeat's pace even
while the scheduler is down: only the scheduler's retries back off.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Protocol

from distributed.scheduler import heartbeat_interval

from .memory import MemoryBreakdown, MemoryModel, WorkerReading
from .names import SOURCE_LOCAL, SOURCE_SCHEDULER
from .process import LocalProcess, LocalReading
from .scheduler import SchedulerPoll, WorkerInfo

__all__ = ["Poller", "Snapshot", "SourceStatus", "WorkerSnapshot"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class WorkerSnapshot:
    """One worker's identity and memory breakdown at the time of the Snapshot."""

    info: WorkerInfo
    memory: MemoryBreakdown
    rss: int | None = None
    """RSS read directly from the OS by a sidecar, when the worker runs beside the exporter."""
    local_only: bool = False
    """A worker process beside the exporter that the scheduler has not reported (not yet, or
    the scheduler is unreachable): only ``rss`` is known. ``info`` holds an empty address and
    a name from the command line (or ``pid:<pid>``); its ``memory`` is not a heartbeat's."""


@dataclass(frozen=True, slots=True)
class SourceStatus:
    """node_exporter-style per-source result of the last poll."""

    name: str
    success: bool
    duration: float


@dataclass(frozen=True)
class Snapshot:
    """Everything the collector renders: immutable, replaced whole after every poll."""

    time: float
    """Unix time at the end of the poll; heartbeat ages are measured against it."""
    workers: tuple[WorkerSnapshot, ...] = ()
    thresholds: Mapping[str, float] = field(default_factory=dict)
    scheduler_up: bool = False
    scheduler_workers: int | None = None
    polled: bool = False
    """True once at least one poll of the scheduler succeeded (readiness)."""
    sources: tuple[SourceStatus, ...] = ()
    poll_duration: float | None = None
    last_success: float | None = None
    polls_total: int = 0
    poll_errors_total: int = 0
    skipped_workers: int = 0
    has_scheduler: bool = True
    """False for a local-only exporter with no scheduler configured: nothing to be up or down."""


class Source(Protocol):
    """What the Poller needs of a scheduler source (see ``scheduler.SchedulerSource``)."""

    async def fetch(self) -> SchedulerPoll: ...
    async def close(self) -> None: ...


class LocalSource(Protocol):
    """What the Poller needs of a local process source (see ``process.LocalProcessSource``)."""

    def read(self, workers: Mapping[str, WorkerInfo] | None = None) -> LocalReading: ...


class Poller:
    """Polls the sources on a timer and publishes a new Snapshot after every attempt.

    The interval follows the scheduler's heartbeat interval for the cluster's size (polling
    faster only re-reads the same heartbeat) and never drops below ``min_interval``. While
    the scheduler is unreachable it retries with exponential backoff up to ``max_backoff``,
    and keeps the last good workers in the Snapshot with ``scheduler_up`` false.
    """

    def __init__(
        self,
        source: Source | None,
        model: MemoryModel,
        thresholds: Mapping[str, float],
        publish: Callable[[Snapshot], Awaitable[None]],
        *,
        local: LocalSource | None = None,
        local_workers_only: bool = False,
        min_interval: float = 0.0,
        max_backoff: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``source`` is the scheduler (None: local processes only); ``local`` reads the
        worker processes beside the exporter; ``local_workers_only`` (mode ``local``) exports
        only the scheduler's workers matched to one of them."""
        if source is None and local is None:
            raise ValueError("the Poller needs a scheduler source, a local source or both")
        self.source = source
        self.local = local
        self.local_workers_only = local_workers_only
        self.model = model
        self.publish = publish
        self.min_interval = min_interval
        self.max_backoff = max_backoff
        self.clock = clock
        self.snapshot = Snapshot(
            time=clock(), thresholds=dict(thresholds), has_scheduler=source is not None
        )
        self._failures = 0
        self._retry_at = 0.0  # monotonic time of the next scheduler attempt (with a local source)
        self._fetching: asyncio.Task[tuple[SchedulerPoll | None, SourceStatus]] | None = None
        self._local_failed = False

    async def poll_once(self) -> Snapshot:
        """One attempt: fetch, decode, read local processes, update the model, publish."""
        prev = self.snapshot
        start = time.perf_counter()
        poll: SchedulerPoll | None = None
        failed = False
        statuses: list[SourceStatus] = []
        if self.source is not None and self.local is None:
            poll, status = await self._fetch()
            failed = not status.success
            statuses.append(status)
        elif self.source is not None:
            # With a local source, a slow or hung scheduler must not hold up the local
            # figures: wait at most one interval, then leave the fetch running for later.
            if self._fetching is None and time.monotonic() >= self._retry_at:
                self._fetching = asyncio.create_task(self._fetch())
            if self._fetching is not None:
                await asyncio.wait({self._fetching}, timeout=self.next_delay())
            if self._fetching is not None and self._fetching.done():
                poll, status = self._fetching.result()
                self._fetching = None
                failed = not status.success
                statuses.append(status)
            else:  # backing off or still waiting: report the scheduler's last result
                statuses.extend(s for s in prev.sources if s.name == SOURCE_SCHEDULER)
        # The scheduler's workers: this poll's, or as last heard of while it is down.
        infos = poll.workers if poll is not None else _known(prev)
        reading: LocalReading | None = None
        if self.local is not None:
            reading, status = await self._read_local(infos)
            failed = failed or not status.success
            statuses.append(status)
        snap = self._build(prev, poll, infos, reading, tuple(statuses), failed, start)
        self.snapshot = snap
        await self.publish(snap)
        return snap

    async def _fetch(self) -> tuple[SchedulerPoll | None, SourceStatus]:
        assert self.source is not None
        start = time.perf_counter()
        try:
            poll = await self.source.fetch()
        except asyncio.CancelledError:
            raise
        except Exception as e:  # any scheduler fault: report it, never crash the exporter
            duration = time.perf_counter() - start
            self._failures += 1
            self._retry_at = time.monotonic() + self._backoff()
            level = logging.WARNING if self._failures == 1 else logging.DEBUG
            logger.log(level, "poll of the scheduler failed: %s", _describe(e))
            return None, SourceStatus(SOURCE_SCHEDULER, False, duration)
        if self._failures:
            logger.info("scheduler reachable again after %d failed polls", self._failures)
        self._failures = 0
        if poll.skipped:
            logger.warning("skipped %d malformed worker entries", poll.skipped)
        return poll, SourceStatus(SOURCE_SCHEDULER, True, time.perf_counter() - start)

    async def _read_local(
        self, known: Mapping[str, WorkerInfo]
    ) -> tuple[LocalReading | None, SourceStatus]:
        assert self.local is not None
        start = time.perf_counter()
        try:
            reading = await asyncio.to_thread(self.local.read, known)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a bug or an odd /proc: report it, keep the heartbeat figures
            if not self._local_failed:
                logger.warning("reading local worker processes failed: %s", _describe(e))
            self._local_failed = True
            return None, SourceStatus(SOURCE_LOCAL, False, time.perf_counter() - start)
        self._local_failed = False
        return reading, SourceStatus(SOURCE_LOCAL, reading.ok, time.perf_counter() - start)

    def _build(
        self,
        prev: Snapshot,
        poll: SchedulerPoll | None,
        infos: Mapping[str, WorkerInfo],
        reading: LocalReading | None,
        sources: tuple[SourceStatus, ...],
        failed: bool,
        start: float,
    ) -> Snapshot:
        matched = reading.matched if reading is not None and reading.ok else {}
        if self.local_workers_only:
            if reading is not None and reading.ok:
                infos = {a: w for a, w in infos.items() if a in matched}
            else:  # process table unreadable: keep the workers matched so far
                before = {w.info.address for w in prev.workers if not w.local_only}
                infos = {a: w for a, w in infos.items() if a in before}
        override = {a: p.rss for a, p in matched.items() if a in infos and p.rss is not None}
        memory = self.model.update({a: w.reading for a, w in infos.items()}, override)
        now = self.clock()
        workers = [
            WorkerSnapshot(info=w, memory=memory[a], rss=override.get(a)) for a, w in infos.items()
        ]
        if reading is not None:
            workers.extend(_local_only(reading.unmatched, now))
        duration = time.perf_counter() - start
        scheduler_up = poll is not None or (
            self.source is not None and prev.scheduler_up and not failed
        )
        return replace(
            prev,
            time=now,
            workers=tuple(workers),
            scheduler_up=scheduler_up,
            scheduler_workers=(
                len(poll.workers) + poll.skipped if poll is not None else prev.scheduler_workers
            ),
            polled=prev.polled or poll is not None,
            sources=sources,
            poll_duration=duration,
            last_success=now if poll is not None else prev.last_success,
            polls_total=prev.polls_total + 1,
            poll_errors_total=prev.poll_errors_total + (1 if failed else 0),
            skipped_workers=poll.skipped if poll is not None else prev.skipped_workers,
        )

    def _backoff(self) -> float:
        base = min(self.max_backoff, 0.5 * 2.0 ** min(self._failures, 16))
        return base * random.uniform(0.8, 1.0)

    def next_delay(self) -> float:
        """Seconds to wait before the next poll."""
        if self._failures and self.local is None:
            return self._backoff()
        n = self.snapshot.scheduler_workers or 0
        return max(self.min_interval, float(heartbeat_interval(n)))

    async def run(self) -> None:
        """Poll until cancelled."""
        try:
            while True:
                started = time.monotonic()
                await self.poll_once()
                elapsed = time.monotonic() - started
                await asyncio.sleep(max(0.0, self.next_delay() - elapsed))
        finally:
            if self._fetching is not None:
                self._fetching.cancel()
                await asyncio.gather(self._fetching, return_exceptions=True)
                self._fetching = None
            if self.source is not None:
                await self.source.close()


def _known(snapshot: Snapshot) -> dict[str, WorkerInfo]:
    """The scheduler's workers as last heard of (while it is down or not configured)."""
    return {w.info.address: w.info for w in snapshot.workers if not w.local_only}


def _local_only(processes: tuple[LocalProcess, ...], now: float) -> list[WorkerSnapshot]:
    """Worker processes the scheduler has not reported: RSS only, labelled by name or pid."""
    procs = [p for p in processes if p.rss is not None]
    names = [p.name or f"pid:{p.pid}" for p in procs]
    out = []
    for p, name in zip(procs, names, strict=True):
        if names.count(name) > 1:  # two nannies with the same --name: keep series distinct
            name = f"pid:{p.pid}"
        rss = p.rss or 0
        info = WorkerInfo(
            address="",
            name=name,
            host="",
            nthreads=0,
            memory_limit=None,
            status="",
            last_seen=now,
            nanny=None,
            reading=WorkerReading(
                process=rss, managed_total=0, spilled_memory=0, spilled_disk=0, heartbeat_time=now
            ),
        )
        memory = MemoryBreakdown(process=rss, managed=0, unmanaged_old=0, spilled=0)
        out.append(WorkerSnapshot(info=info, memory=memory, rss=rss, local_only=True))
    return out


def _describe(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else ""
    if isinstance(e, asyncio.TimeoutError):
        return "timed out"
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
