"""The immutable Snapshot of one poll, and the Poller that makes one per heartbeat interval.

Data flows one way: sources -> memory model -> Snapshot -> collector -> HTTP. The Poller is
the only place that awaits a source and the only place with a timer; it swaps in a new
Snapshot atomically after each attempt, successful or not, so HTTP handlers only ever read
a finished Snapshot and a slow or dead scheduler never blocks a scrape. It does not render
metrics (``collector.py``) nor serve them (``app.py``).
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

from .memory import MemoryBreakdown, MemoryModel
from .names import SOURCE_SCHEDULER
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


class Source(Protocol):
    """What the Poller needs of a scheduler source (see ``scheduler.SchedulerSource``)."""

    async def fetch(self) -> SchedulerPoll: ...
    async def close(self) -> None: ...


class Poller:
    """Polls the sources on a timer and publishes a new Snapshot after every attempt.

    The interval follows the scheduler's heartbeat interval for the cluster's size (polling
    faster only re-reads the same heartbeat) and never drops below ``min_interval``. While
    the scheduler is unreachable it retries with exponential backoff up to ``max_backoff``,
    and keeps the last good workers in the Snapshot with ``scheduler_up`` false.
    """

    def __init__(
        self,
        source: Source,
        model: MemoryModel,
        thresholds: Mapping[str, float],
        publish: Callable[[Snapshot], Awaitable[None]],
        *,
        min_interval: float = 0.0,
        max_backoff: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.source = source
        self.model = model
        self.publish = publish
        self.min_interval = min_interval
        self.max_backoff = max_backoff
        self.clock = clock
        self.snapshot = Snapshot(time=clock(), thresholds=dict(thresholds))
        self._failures = 0

    async def poll_once(self) -> Snapshot:
        """One attempt: fetch, decode, update the model, build and publish a Snapshot."""
        prev = self.snapshot
        start = time.perf_counter()
        try:
            poll = await self.source.fetch()
        except asyncio.CancelledError:
            raise
        except Exception as e:  # any scheduler fault: report it, never crash the exporter
            duration = time.perf_counter() - start
            self._failures += 1
            level = logging.WARNING if self._failures == 1 else logging.DEBUG
            logger.log(level, "poll of the scheduler failed: %s", _describe(e))
            snap = replace(
                prev,
                time=self.clock(),
                scheduler_up=False,
                sources=(SourceStatus(SOURCE_SCHEDULER, False, duration),),
                poll_duration=duration,
                polls_total=prev.polls_total + 1,
                poll_errors_total=prev.poll_errors_total + 1,
            )
        else:
            if self._failures:
                logger.info("scheduler reachable again after %d failed polls", self._failures)
            self._failures = 0
            snap = self._build(prev, poll, start)
        self.snapshot = snap
        await self.publish(snap)
        return snap

    def _build(self, prev: Snapshot, poll: SchedulerPoll, start: float) -> Snapshot:
        readings = {addr: w.reading for addr, w in poll.workers.items()}
        memory = self.model.update(readings)
        workers = tuple(
            WorkerSnapshot(info=w, memory=memory[addr]) for addr, w in poll.workers.items()
        )
        if poll.skipped:
            logger.warning("skipped %d malformed worker entries", poll.skipped)
        duration = time.perf_counter() - start
        now = self.clock()
        return replace(
            prev,
            time=now,
            workers=workers,
            scheduler_up=True,
            scheduler_workers=len(poll.workers) + poll.skipped,
            polled=True,
            sources=(SourceStatus(SOURCE_SCHEDULER, True, duration),),
            poll_duration=duration,
            last_success=now,
            polls_total=prev.polls_total + 1,
            skipped_workers=poll.skipped,
        )

    def next_delay(self) -> float:
        """Seconds to wait before the next poll."""
        if self._failures:
            base = min(self.max_backoff, 0.5 * 2.0 ** min(self._failures, 16))
            return base * random.uniform(0.8, 1.0)
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
            await self.source.close()


def _describe(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else ""
    if isinstance(e, asyncio.TimeoutError):
        return "timed out"
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
