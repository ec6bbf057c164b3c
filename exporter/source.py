"""The source plug-in contract: what a source fetches and what it contributes to a poll.

A source is anything with a ``name``, the per-worker metric families it owns, an async
``fetch`` and a ``close``. The Poller (``snapshot.py``) runs any list of sources the same way:
it times each fetch, counts its errors, backs it off while it fails and never lets a slow one
hold up the others. It knows no source by name.

One source may be the *roster*: the one that says which workers the cluster has (the
scheduler). The Poller runs it first and hands its workers, or the last ones it heard of, to
every other source's ``fetch``, so a sidecar can match its processes to them.

This module holds only types: no I/O, and it imports no source.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from .memory import MemoryBreakdown, WorkerReading
from .names import Metric

__all__ = [
    "REASON_OTHER",
    "REASON_TIMEOUT",
    "LocalOnlyProcess",
    "Source",
    "SourceError",
    "SourceResult",
    "WorkerInfo",
]

REASON_TIMEOUT = "timeout"
"""A fetch that did not finish within its time (``asyncio.TimeoutError``)."""
REASON_OTHER = "other"
"""A failure the source did not classify (a bug, most likely: it is logged)."""


class SourceError(Exception):
    """A failed fetch with its cause: ``reason`` is one of the source's ``reasons``, the
    ``reason`` label of ``dask_memory_exporter_source_errors_total``; the message says the
    rest in one line."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """One worker as the roster (the scheduler) last heard of it."""

    address: str
    name: str
    host: str
    nthreads: int
    memory_limit: int | None
    status: str
    last_seen: float
    nanny: str | None
    reading: WorkerReading


@dataclass(frozen=True, slots=True)
class LocalOnlyProcess:
    """A worker process beside the exporter that the roster has not reported.

    Not yet (it is starting), or not at all (the scheduler is unreachable, or several workers
    of one nanny cannot be told apart). Only its RSS is known: it is exported as
    ``dask_memory_worker_rss_bytes`` with an empty ``worker`` label and ``name`` as
    ``worker_name``, with the sidecar's own families (``values``), and as nothing else.
    """

    name: str
    """``--name`` from the nanny's command line, or ``pid:<pid>``."""
    pid: int
    rss: int
    values: Mapping[Metric, float] = field(default_factory=dict)
    """Values of a sidecar source's own per-worker families (the event-loop probe)."""


@dataclass(frozen=True, slots=True)
class SourceResult:
    """What one fetch of one source contributes to the Snapshot.

    Every field is optional: each source fills what it knows.
    """

    workers: Mapping[str, WorkerInfo] | None = None
    """The roster (roster sources only): every worker the cluster has, by address."""
    skipped: int = 0
    """Roster entries that could not be decoded (skipped, counted, the others exported)."""
    rss: Mapping[str, int] = field(default_factory=dict)
    """Process memory read directly from the OS, by worker address: replaces the
    heartbeat's figure in the memory breakdown."""
    local_only: tuple[LocalOnlyProcess, ...] = ()
    """Worker processes this source sees that the roster has not reported."""
    values: Mapping[str, Mapping[Metric, float]] = field(default_factory=dict)
    """Per worker address, the values of the source's own per-worker families."""
    gauges: Mapping[Metric, float] = field(default_factory=dict)
    """The source's own unlabelled self-metrics (e.g. processes it could not read)."""
    memory: Mapping[str, MemoryBreakdown] | None = None
    """A ready breakdown by worker address (roster sources only), used as it is instead of
    the model's mirror of the heartbeats: a source inside the scheduler's process reads the
    scheduler's own ``WorkerState.memory``, exact, sliding window included."""


class Source(Protocol):
    """A plug-in source of per-worker data."""

    name: str
    """The ``source`` label of the exporter's per-source self-metrics."""
    roster: bool
    """True for the one source that says which workers exist (the scheduler)."""
    families: tuple[Metric, ...]
    """The per-worker families whose values this source puts in ``SourceResult.values``."""
    reasons: tuple[str, ...]
    """The ``SourceError.reason`` values it raises (a bounded set: each is a series, exported
    from the start at 0, beside ``timeout`` and ``other``)."""

    async def fetch(self, workers: Mapping[str, WorkerInfo]) -> SourceResult:
        """One fetch. ``workers`` is the roster as last heard of. Raise on failure,
        preferably a SourceError naming the cause."""
        ...

    async def close(self) -> None:
        """Release connections; the next fetch reopens them."""
        ...
