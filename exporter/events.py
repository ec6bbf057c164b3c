"""EventsSource: what happened to workers, from the scheduler's own event log.

Memory figures say how close a worker came to its limits; this source says whether it got
there. It reads the scheduler's ``events`` handler (a plain handler call, as the scheduler
source does: no Client, no code run on the scheduler) and counts:

- **memory restarts**: the nanny logs a ``worker-restart-memory`` event (worker address, pid,
  rss) on the scheduler each time it kills its worker for passing the terminate threshold.
  Counted per ``worker_name``, which the restarted worker keeps where its address changes.
- **workers lost**: when a worker leaves, the scheduler logs a ``remove-worker`` event on the
  worker's own address topic, with ``expected`` and the tasks lost with it. Departures not
  expected (not retired, not closed) are counted by cause, with their tasks by kind.

Cost per poll is bounded: one ``identity(n_workers=0)`` call (the scheduler's id, a few
hundred bytes), one fetch of the ``worker-restart-memory`` topic (at most
``distributed.admin.low-level-log-length`` events, 1,000 by default, and usually none), and
one fetch of each departed worker's own topic, once, at most :data:`MAX_TOPICS_PER_POLL` per
poll. It never reads the ``all`` topic, whose every client action would be shipped each poll.
``benchmarks/events_bench.py`` measures it (docs/performance.md).

Counting rules (docs/metrics.md, "Outcomes"):

- The restart counter is a function of the scheduler's log: the memory restarts it logged
  since it started. An exporter that starts (or restarts) counts every event the topic holds,
  so the counter comes back with the value it had; later polls count only events newer than
  the newest counted (their timestamps), so nothing is counted twice. If the topic is full at
  start (``event_log_length`` events), older ones may have rotated out: the exporter then
  cannot rebuild the total and starts from zero at the newest event, which Prometheus reads as
  a counter reset. A new scheduler (another ``id``) starts a new log: the counts restart at 0.
- Lost workers and tasks are counted as the exporter sees workers leave its roster: they
  start from 0 when the exporter starts (the records of departures before that are in the
  ``all`` topic, which rotates too fast in a busy cluster to rebuild a total from).

It does not say why a worker's unmanaged memory grew: ``dask-memory-exporter diagnose`` does.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from distributed.comm.addressing import get_address_host
from distributed.security import Security

from . import names as n
from .names import Metric
from .scheduler import REASONS, SchedulerConnection
from .source import SourceResult, WorkerInfo

__all__ = [
    "CAUSE_GRACE_SECONDS",
    "MAX_TOPICS_PER_POLL",
    "RESTART_TOPIC",
    "Departure",
    "EventsSource",
    "InProcessScheduler",
    "cause_of",
    "read_departure",
]

logger = logging.getLogger(__name__)

RESTART_TOPIC = "worker-restart-memory"
"""The topic the nanny logs its memory kills on (distributed.worker_memory.NannyMemoryManager)."""
MAX_TOPICS_PER_POLL = 20
"""Departed workers' topics fetched per poll at most; the rest wait for the next polls (the
scheduler keeps a departed worker's topic for ``distributed.scheduler.events-cleanup-delay``,
an hour by default)."""
CAUSE_GRACE_SECONDS = 5.0
"""How long a departure with no memory-restart event yet waits for one before it is counted
under its other cause: the nanny sends its event in the background, just before it kills the
worker, so the scheduler may notice the closed connection first."""
MAX_REMEMBERED = 10_000
"""Addresses remembered (names, memory restarts, departures counted): bounded memory."""

_STIMULUS_CAUSES = (
    ("handle-worker-cleanup", n.CAUSE_CONNECTION_LOST),
    # the nanny reports that its worker process exited by itself
    ("nanny-close", n.CAUSE_CONNECTION_LOST),
    ("check-worker-ttl", n.CAUSE_HEARTBEAT_TIMEOUT),
)
_TASK_LISTS = (
    (n.TASKS_COMPUTED, "lost-computed-tasks"),
    (n.TASKS_SCATTERED, "lost-scattered-tasks"),
    (n.TASKS_PROCESSING, "processing-tasks"),
)


@dataclass(frozen=True, slots=True)
class Departure:
    """An unexpected ``remove-worker`` event of one worker."""

    address: str
    time: float
    """The event's timestamp (the scheduler's clock)."""
    stimulus_id: str
    tasks: tuple[tuple[str, int], ...]
    """(kind, count) for each of ``names.TASK_KINDS``."""


def _count(v: Any) -> int:
    return len(v) if isinstance(v, set | frozenset | list | tuple | dict) else 0


def read_departure(address: str, events: Iterable[Any]) -> Departure | None:
    """The worker's last ``remove-worker`` event, if it left unexpectedly; else None.

    ``events`` is its topic as the handler returns it: ``(timestamp, message)`` pairs. Entries
    of another shape are ignored (one odd event hides nothing else).
    """
    last: tuple[float, Mapping[str, Any]] | None = None
    for ev in events:
        try:
            ts, msg = ev
        except (TypeError, ValueError):
            continue
        if isinstance(msg, Mapping) and msg.get("action") == "remove-worker" and _number(ts):
            last = (float(ts), msg)
    if last is None:
        return None
    ts, msg = last
    if msg.get("expected", False):
        return None
    tasks = tuple((kind, _count(msg.get(key))) for kind, key in _TASK_LISTS)
    return Departure(address, ts, str(msg.get("stimulus_id", "")), tasks)


def cause_of(stimulus_id: str) -> str:
    """The cause of a departure with no memory-restart record, from the scheduler's stimulus."""
    for prefix, cause in _STIMULUS_CAUSES:
        if stimulus_id.startswith(prefix):
            return cause
    return n.CAUSE_OTHER


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _remember(d: OrderedDict[str, Any], key: str, value: Any) -> None:
    d[key] = value
    d.move_to_end(key)
    while len(d) > MAX_REMEMBERED:
        d.popitem(last=False)


class InProcessScheduler:
    """The two handlers the source calls, on the scheduler object itself: for the exporter
    inside the scheduler's process (``preload.py``), where there is nothing to connect to.

    Both are plain reads on the scheduler's event loop: ``identity(n_workers=0)`` copies a few
    fields, ``get_events`` one topic's deque into a tuple (the events themselves are shared,
    and only read).
    """

    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler

    async def call(self, op: str, **kwargs: Any) -> Any:
        if op == "identity":
            return self.scheduler.identity(n_workers=0)
        if op == "events":
            return self.scheduler.get_events(kwargs["topic"])
        raise ValueError(f"no handler {op!r} here")

    async def close(self) -> None:
        pass


class EventsSource:
    """Outcome counters from the scheduler's event log (see the module docstring)."""

    name = n.SOURCE_EVENTS
    roster = False
    families: tuple[Metric, ...] = ()
    reasons: tuple[str, ...] = REASONS

    def __init__(
        self,
        address: str,
        security: Security,
        timeout: float,
        *,
        log_length: int = 1000,
        clock: Callable[[], float] = time.monotonic,
        connection: SchedulerConnection | InProcessScheduler | None = None,
    ) -> None:
        """``log_length``: the scheduler's ``distributed.admin.low-level-log-length`` (a
        topic that holds this many events may have lost older ones). ``connection``: how the
        handlers are called (default: over a comm to ``address``)."""
        self.connection = connection or SchedulerConnection(address, security, timeout)
        self.log_length = log_length
        self.clock = clock
        self.scheduler_id: str | None = None
        self.names: OrderedDict[str, str] = OrderedDict()
        """Worker address -> name, for every worker the roster reported."""
        self.last_roster: set[str] | None = None
        self.to_fetch: OrderedDict[str, None] = OrderedDict()
        """Departed workers whose topic is still to be read."""
        self.waiting: list[tuple[Departure, float]] = []
        """Departures waiting CAUSE_GRACE_SECONDS for a memory-restart event (found at)."""
        self.counted: OrderedDict[str, float] = OrderedDict()
        """Departures counted: address -> event timestamp."""
        self.memory_killed: OrderedDict[str, float] = OrderedDict()
        """Addresses a worker-restart-memory event names."""
        self.restarts: dict[str, int] = {}
        self.watermark: float | None = None
        """Timestamp of the newest restart event counted (None: the log not read yet)."""
        self.at_watermark: set[tuple[str, Any]] = set()
        self.lost: dict[str, int] = dict.fromkeys(n.CAUSES, 0)
        self.lost_tasks: dict[str, int] = dict.fromkeys(n.TASK_KINDS, 0)

    async def fetch(self, workers: Mapping[str, WorkerInfo]) -> SourceResult:
        """One poll of the event log; raises a SourceError naming the cause."""
        identity = await self.connection.call("identity", n_workers=0)
        self._check_scheduler(identity)
        n_workers = identity.get("n_workers") if isinstance(identity, Mapping) else None
        if n_workers and not workers:
            # The scheduler has workers but the roster has not reported them yet (the first
            # poll, or the roster's fetch still running): names would be unknown. Wait.
            return self.result(workers)
        for address, w in workers.items():
            _remember(self.names, address, w.name)
        if self.last_roster is not None:
            for address in self.last_roster - workers.keys():
                self.to_fetch[address] = None
        self.last_roster = set(workers)
        self._count_restarts(await self.connection.call("events", topic=RESTART_TOPIC), workers)
        for address in list(self.to_fetch)[:MAX_TOPICS_PER_POLL]:
            topic = await self.connection.call("events", topic=address)
            del self.to_fetch[address]  # read once, whatever it holds
            if address in workers:
                continue  # it came back (a roster reported while it reconnected)
            departure = read_departure(address, topic if isinstance(topic, Iterable) else ())
            if departure is not None and self.counted.get(address) != departure.time:
                _remember(self.counted, address, departure.time)
                self.waiting.append((departure, self.clock()))
        self._settle()
        return self.result(workers)

    def _check_scheduler(self, identity: Any) -> None:
        """A scheduler with another id has a new, empty event log: its counts start again."""
        sid = str(identity.get("id", "")) if isinstance(identity, Mapping) else ""
        if sid == self.scheduler_id:
            return
        if self.scheduler_id is not None:
            logger.info("new scheduler %s: memory restart counts start again from its log", sid)
        self.scheduler_id = sid
        self.restarts.clear()
        self.watermark = None
        self.at_watermark.clear()
        self.last_roster = None
        self.to_fetch.clear()

    def _count_restarts(self, events: Any, workers: Mapping[str, WorkerInfo]) -> None:
        """Count the restart events not counted yet (by timestamp; see the module docstring)."""
        evs: list[tuple[float, Mapping[str, Any]]] = []
        for ev in events if isinstance(events, Iterable) else ():
            try:
                ts, msg = ev
            except (TypeError, ValueError):
                continue
            if _number(ts) and isinstance(msg, Mapping) and isinstance(msg.get("worker"), str):
                evs.append((float(ts), msg))
        if not evs:
            if self.watermark is None:
                self.watermark = -float("inf")
            return
        newest = max(ts for ts, _ in evs)
        if self.watermark is None and len(evs) >= self.log_length:
            logger.warning(
                "the scheduler's %s log is full (%d events): older memory restarts may have "
                "rotated out, so their count starts from 0 at the newest",
                RESTART_TOPIC,
                len(evs),
            )
            self.watermark = newest
            self.at_watermark = {_key(m) for ts, m in evs if ts == newest}
        for ts, msg in evs:
            _remember(self.memory_killed, msg["worker"], ts)
            wm = self.watermark
            if wm is not None and (ts < wm or (ts == wm and _key(msg) in self.at_watermark)):
                continue
            name = self._name_of(msg["worker"], workers)
            self.restarts[name] = self.restarts.get(name, 0) + 1
        if self.watermark is None or newest > self.watermark:
            self.watermark = newest
            self.at_watermark = set()
        self.at_watermark |= {_key(m) for ts, m in evs if ts == self.watermark}

    def _name_of(self, address: str, workers: Mapping[str, WorkerInfo]) -> str:
        """The name of the worker that had ``address``.

        Known if the roster ever reported it. Otherwise (it was killed before this exporter
        started, or within one poll) the one current worker on the same host, if there is
        exactly one (one worker per pod or machine: the restarted worker has its name); else
        "" (unknown, several workers share the host).
        """
        name = self.names.get(address)
        if name is not None:
            return name
        try:
            host = get_address_host(address)
        except ValueError:
            return ""
        on_host = {w.name for w in workers.values() if w.host == host}
        return on_host.pop() if len(on_host) == 1 else ""

    def _settle(self) -> None:
        """Count the departures whose cause is known: a memory restart, or the grace is over."""
        now = self.clock()
        still: list[tuple[Departure, float]] = []
        for departure, found in self.waiting:
            if departure.address in self.memory_killed:
                cause = n.CAUSE_MEMORY_RESTART
            elif now - found >= CAUSE_GRACE_SECONDS:
                cause = cause_of(departure.stimulus_id)
            else:
                still.append((departure, found))
                continue
            self.lost[cause] += 1
            for kind, count in departure.tasks:
                self.lost_tasks[kind] += count
        self.waiting = still

    def result(self, workers: Mapping[str, WorkerInfo]) -> SourceResult:
        """The counters: every cause and kind from 0, and every current worker's name."""
        restarts: dict[tuple[str, ...], float] = {(w.name,): 0.0 for w in workers.values()}
        restarts.update({(name,): float(c) for name, c in self.restarts.items()})
        return SourceResult(
            counters={
                n.WORKER_MEMORY_RESTARTS_TOTAL: restarts,
                n.WORKERS_LOST_TOTAL: {(c,): float(v) for c, v in self.lost.items()},
                n.LOST_TASKS_TOTAL: {(k,): float(v) for k, v in self.lost_tasks.items()},
            }
        )

    async def close(self) -> None:
        await self.connection.close()


def _key(msg: Mapping[str, Any]) -> tuple[str, Any]:
    """One restart event's identity beside its timestamp (two at the same instant differ)."""
    return (str(msg.get("worker")), msg.get("pid"))
