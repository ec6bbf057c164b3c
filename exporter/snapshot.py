"""The immutable Snapshot of one poll, and the Poller that makes one per heartbeat interval.

Data flows one way: sources -> memory model -> Snapshot -> collector -> HTTP. The Poller is
the only place that awaits a source and the only place with a timer; it swaps in a new
Snapshot atomically after each attempt, successful or not, so HTTP handlers only ever read
a finished Snapshot and a slow or dead scheduler never blocks a scrape. It does not render
metrics (``collector.py``) nor serve them (``app.py``).

Sources are plug-ins (``source.Source``) and the Poller runs any list of them the same way:
the roster source (the scheduler) first, then the others with the roster it produced or last
heard of. Each source has its own success, duration, error count and backoff; a fetch that
does not finish within the poll interval is left running and its result used by a later
poll, so a hung source never holds up the others.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from distributed.scheduler import heartbeat_interval

from .memory import MemoryBreakdown, MemoryModel
from .names import Metric
from .source import (
    REASON_OTHER,
    REASON_TIMEOUT,
    LocalOnlyProcess,
    Source,
    SourceError,
    SourceResult,
    WorkerInfo,
)

__all__ = ["Poller", "Snapshot", "SourceStatus", "WorkerSnapshot"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class WorkerSnapshot:
    """One worker the roster reported: its identity and memory breakdown at the Snapshot."""

    info: WorkerInfo
    memory: MemoryBreakdown
    rss: int | None = None
    """RSS read directly from the OS by a sidecar, when the worker runs beside the exporter
    (then ``memory.process`` is this figure, and ``info.reading.process`` the heartbeat's)."""
    values: Mapping[Metric, float] = field(default_factory=dict)
    """Values of the plug-in sources' own per-worker families."""


@dataclass(frozen=True, slots=True)
class SourceStatus:
    """node_exporter-style result of a source's last completed fetch, and its error counts."""

    name: str
    success: bool
    duration: float
    errors: tuple[tuple[str, int], ...] = ()
    """(reason, failed fetches since start) for every reason the source can report."""

    @property
    def errors_total(self) -> int:
        return sum(c for _, c in self.errors)


@dataclass(frozen=True)
class Snapshot:
    """Everything the collector renders: immutable, replaced whole after every poll."""

    time: float
    """Unix time at the end of the poll; heartbeat ages are measured against it."""
    workers: tuple[WorkerSnapshot, ...] = ()
    local_only: tuple[LocalOnlyProcess, ...] = ()
    """Worker processes beside the exporter that the scheduler has not reported."""
    thresholds: Mapping[str, float] = field(default_factory=dict)
    families: tuple[Metric, ...] = ()
    """The plug-in sources' per-worker families, in exposition order."""
    scheduler_up: bool = False
    scheduler_workers: int | None = None
    polled: bool = False
    """True once at least one fetch of the roster succeeded (readiness)."""
    sources: tuple[SourceStatus, ...] = ()
    source_gauges: Mapping[Metric, float] = field(default_factory=dict)
    poll_duration: float | None = None
    last_success: float | None = None
    polls_total: int = 0
    skipped_workers: int = 0
    has_scheduler: bool = True
    """False for a local-only exporter with no scheduler configured: nothing to be up or down."""
    clusters: Mapping[str, Snapshot] = field(default_factory=dict)
    """Gateway mode (``gateway.py``): each cluster's own Snapshot by cluster name. This Snapshot
    then holds no workers, only the gateway's status (its listing as source ``gateway``); the
    collector labels every series of a cluster with ``cluster``."""


class _Runner:
    """One source as the Poller runs it: its fetch in flight, status, errors and backoff."""

    def __init__(self, source: Source, max_backoff: float) -> None:
        self.source = source
        self.max_backoff = max_backoff
        self.failures = 0
        self.retry_at = 0.0  # monotonic
        self.task: asyncio.Task[SourceResult] | None = None
        self.started = 0.0
        self.status: SourceStatus | None = None
        self.last: SourceResult | None = None
        """The last successful result: its figures stand while the source is down."""
        self.last_success = -float("inf")  # monotonic
        reasons = (*source.reasons, REASON_TIMEOUT, REASON_OTHER)
        self.errors: dict[str, int] = dict.fromkeys(reasons, 0)

    async def step(self, workers: Mapping[str, WorkerInfo], wait: float | None) -> bool:
        """Start a fetch unless one is in flight or backing off; wait up to ``wait`` seconds.

        Returns True if a fetch completed (its status and result are then updated).
        """
        if self.task is None and time.monotonic() >= self.retry_at:
            self.started = time.perf_counter()
            self.task = asyncio.create_task(self.source.fetch(workers))
        if self.task is None:
            return False
        if not self.task.done():
            await asyncio.wait({self.task}, timeout=wait)
        if not self.task.done():
            return False
        task, self.task = self.task, None
        self._complete(task)
        return True

    def _complete(self, task: asyncio.Task[SourceResult]) -> None:
        duration = time.perf_counter() - self.started
        name = self.source.name
        error = task.exception()
        if error is None:
            if self.failures:
                logger.info("source %s works again after %d failures", name, self.failures)
            self.failures = 0
            self.last = task.result()
            self.last_success = time.monotonic()
        else:
            reason, why = classify(error)
            if reason not in self.errors:  # a reason the source did not declare: bounded
                reason = REASON_OTHER
            self.failures += 1
            self.errors[reason] += 1
            self.retry_at = time.monotonic() + self.backoff()
            # The first failure of a run of them is a warning, the rest are debug: an outage
            # is reported once, not every heartbeat.
            level = logging.WARNING if self.failures == 1 else logging.DEBUG
            logger.log(level, "source %s failed (%s): %s", name, reason, why)
            if reason == REASON_OTHER:
                logger.debug("source %s failure", name, exc_info=error)
        errors = tuple(self.errors.items())
        self.status = SourceStatus(name, error is None, duration, errors)

    def backoff(self) -> float:
        base = min(self.max_backoff, 0.5 * 2.0 ** min(self.failures, 16))
        return base * random.uniform(0.8, 1.0)

    async def cancel(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
            self.task = None


class Poller:
    """Polls the sources on a timer and publishes a new Snapshot after every attempt.

    The interval follows the scheduler's heartbeat interval for the cluster's size (polling
    faster only re-reads the same heartbeat) and never drops below ``min_interval``. A
    failing source is retried with exponential backoff up to ``max_backoff``; while the
    roster is unreachable the last workers heard of stay in the Snapshot with
    ``scheduler_up`` false.
    """

    def __init__(
        self,
        sources: Sequence[Source],
        model: MemoryModel,
        thresholds: Mapping[str, float],
        publish: Callable[[Snapshot], Awaitable[None]],
        *,
        local_workers_only: bool = False,
        min_interval: float = 0.0,
        max_backoff: float = 30.0,
        stale_after: float | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``local_workers_only`` (mode ``local``) exports only the roster's workers that a
        source read the RSS of (the processes beside the exporter). ``stale_after``: how long
        the roster's last workers are served after it was lost (None: :meth:`stale_limit`)."""
        if not sources:
            raise ValueError("the Poller needs at least one source")
        rosters = [s for s in sources if s.roster]
        if len(rosters) > 1:
            raise ValueError("at most one source can be the roster")
        self.roster = _Runner(rosters[0], max_backoff) if rosters else None
        self.others = [_Runner(s, max_backoff) for s in sources if not s.roster]
        self.local_workers_only = local_workers_only
        self.model = model
        self.publish = publish
        self.min_interval = min_interval
        self.stale_after = stale_after
        self.clock = clock
        families = tuple(f for s in sources for f in s.families)
        self.snapshot = Snapshot(
            time=clock(),
            thresholds=dict(thresholds),
            families=families,
            has_scheduler=self.roster is not None,
        )

    @property
    def runners(self) -> list[_Runner]:
        return [*([self.roster] if self.roster else []), *self.others]

    async def poll_once(self, budget: float | None = None) -> Snapshot:
        """One attempt: fetch from every source, update the model, publish.

        ``budget``: the most seconds to wait for the roster. A fetch still running then is
        left in flight and its result used by a later poll (the gateway mode polls many
        clusters under one budget this way).
        """
        prev = self.snapshot
        start = time.perf_counter()
        # The roster first; alone, it is awaited to the end (its own timeout bounds it).
        fresh = False  # a roster fetch completed and succeeded in this poll
        if self.roster is not None:
            wait = budget if budget is not None else self.next_delay() if self.others else None
            completed = await self.roster.step(_known(prev), wait)
            fresh = completed and self.roster.status is not None and self.roster.status.success
        roster = self.roster.last if self.roster is not None else None
        if fresh and roster is not None:
            infos = dict(roster.workers or {})
        elif self.roster is not None and self._stale():
            infos = {}  # the last workers heard of are too old to present as current
        else:
            infos = _known(prev)
        if self.others:
            await asyncio.gather(*(r.step(infos, self.next_delay()) for r in self.others))
        # Building the Snapshot (a thousand workers' breakdowns) runs in a thread: the event
        # loop may be a scheduler's (the preload), and scrapes keep being answered meanwhile.
        snap = await asyncio.to_thread(self._build, prev, infos, fresh, start)
        self.snapshot = snap
        await self.publish(snap)
        return snap

    def _build(
        self, prev: Snapshot, infos: dict[str, WorkerInfo], fresh: bool, start: float
    ) -> Snapshot:
        results = [r.last for r in self.runners if r.last is not None and _usable(r)]
        rss: dict[str, int] = {}
        local_only: list[LocalOnlyProcess] = []
        values: dict[str, dict[Metric, float]] = {}
        gauges: dict[Metric, float] = {}
        for res in results:
            rss.update(res.rss)
            local_only.extend(res.local_only)
            gauges.update(res.gauges)
            for addr, vals in res.values.items():
                values.setdefault(addr, {}).update(vals)
        reported = len(infos)
        if self.local_workers_only:
            readable = any(_usable(r) for r in self.others)
            keep = rss.keys() if readable else {w.info.address for w in prev.workers}
            infos = {a: w for a, w in infos.items() if a in keep}
        override = {a: v for a, v in rss.items() if a in infos}
        # A breakdown a source hands over ready (read inside the scheduler) is used as it
        # is; the model mirrors the heartbeats of the other workers.
        exact = {a: m for a, m in _exact(results).items() if a in infos and a not in override}
        readings = {a: w.reading for a, w in infos.items() if a not in exact}
        memory = {**self.model.update(readings, override), **exact}
        workers = tuple(
            WorkerSnapshot(info=w, memory=memory[a], rss=override.get(a), values=values.get(a, {}))
            for a, w in infos.items()
        )
        now = self.clock()
        roster = self.roster
        up = roster is not None and roster.status is not None and roster.status.success
        skipped = roster.last.skipped if roster is not None and roster.last else 0
        return replace(
            prev,
            time=now,
            workers=workers,
            local_only=tuple(local_only),
            scheduler_up=up,
            scheduler_workers=reported + skipped if fresh else prev.scheduler_workers,
            polled=prev.polled or fresh,
            sources=tuple(r.status for r in self.runners if r.status is not None),
            source_gauges=gauges,
            poll_duration=time.perf_counter() - start,
            last_success=now if fresh else prev.last_success,
            polls_total=prev.polls_total + 1,
            skipped_workers=skipped,
        )

    def stale_limit(self) -> float:
        """Seconds the last workers are served after the roster was lost: ``stale_after``,
        or by default five heartbeat intervals and at least 10 s."""
        if self.stale_after is not None:
            return self.stale_after
        n = self.snapshot.scheduler_workers or 0
        return max(10.0, 5 * float(heartbeat_interval(n)))

    def _stale(self) -> bool:
        assert self.roster is not None
        return time.monotonic() - self.roster.last_success > self.stale_limit()

    def next_delay(self) -> float:
        """Seconds to wait before the next poll: the heartbeat interval, or while every
        source is backing off, until the first of them may be retried."""
        runners = self.runners
        if all(r.failures for r in runners):
            return max(0.0, min(r.retry_at for r in runners) - time.monotonic())
        n = self.snapshot.scheduler_workers or 0
        return max(self.min_interval, float(heartbeat_interval(n)))

    @property
    def fetch_done(self) -> bool:
        """True when a roster fetch left in flight by an earlier poll has finished."""
        task = self.roster.task if self.roster is not None else None
        return task is not None and task.done()

    async def run(self) -> None:
        """Poll until cancelled. An error outside the sources (each source's own failures are
        caught and counted by its runner) is logged and the next poll runs as usual: the
        poller task never dies while the HTTP server keeps serving a frozen exposition."""
        failed = False
        try:
            while True:
                started = time.monotonic()
                try:
                    await self.poll_once()
                except Exception:  # a bug past the sources (model, render): keep polling
                    # Logged once per run of failures: never a traceback every heartbeat.
                    if not failed:
                        logger.exception("poll failed; the last exposition stays served")
                    failed = True
                else:
                    failed = False
                elapsed = time.monotonic() - started
                await asyncio.sleep(max(0.0, self.next_delay() - elapsed))
        finally:
            await self.close()

    async def close(self) -> None:
        """Cancel fetches in flight and close every source."""
        for r in self.runners:
            await r.cancel()
            await r.source.close()


def _usable(r: _Runner) -> bool:
    """A source's last result is used while its last completed fetch succeeded, and for the
    roster while it is down too (the last workers heard of, flagged by scheduler_up)."""
    return r.source.roster or (r.status is not None and r.status.success)


def _exact(results: Sequence[SourceResult]) -> dict[str, MemoryBreakdown]:
    """The ready breakdowns of the results that carry them, by worker address."""
    out: dict[str, MemoryBreakdown] = {}
    for res in results:
        if res.memory:
            out.update(res.memory)
    return out


def _known(snapshot: Snapshot) -> dict[str, WorkerInfo]:
    """The roster's workers as last heard of (while it is down or not configured)."""
    return {w.info.address: w.info for w in snapshot.workers}


def classify(e: BaseException) -> tuple[str, str]:
    """A fetch's failure as (reason, one line)."""
    if isinstance(e, SourceError):
        return e.reason, str(e)
    if isinstance(e, asyncio.TimeoutError):
        return REASON_TIMEOUT, "timed out"
    text = str(e).splitlines()[0] if str(e) else ""
    return REASON_OTHER, f"{type(e).__name__}: {text}" if text else type(e).__name__
