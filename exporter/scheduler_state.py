"""SchedulerStateSource: the roster read from the scheduler's own state, inside its process.

When the exporter runs as a scheduler preload (``preload.py``) there is nothing to poll:
``Scheduler.workers`` holds every ``WorkerState``, and ``WorkerState.memory`` is the exact
breakdown the Dask dashboard draws, the scheduler's own sliding window of unmanaged memory
included. This source copies what the exporter needs out of those objects into plain, frozen
``WorkerInfo`` values and a ready ``MemoryBreakdown`` per worker; the rest of the pipeline
(snapshot, collector, HTTP) is the same as for a polled scheduler.

The scheduler mutates its state on its event loop and nowhere else, so what changes (the
``MemoryState``, the heartbeat's ``metrics`` dict, ``nbytes``, ``last_seen``, ``status``) is
captured on the loop, in one synchronous pass with no await in it: one consistent instant, and
the only part of the exporter's work that must hold the scheduler's loop (about two
microseconds per worker). The exporter's values are built from the capture in a thread, and
rendered later in a thread too (``benchmarks/preload_cost.py``).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Mapping
from typing import Any

from .heartbeat import HEARTBEAT_GAUGES, read_heartbeat
from .memory import MemoryBreakdown, WorkerReading
from .names import SOURCE_SCHEDULER, Metric
from .source import SourceResult, WorkerInfo

__all__ = ["SchedulerStateSource", "capture", "read_captured"]

logger = logging.getLogger(__name__)


def _count(v: Any) -> int:
    """A byte count from the scheduler's state; anything else (a broken heartbeat) is 0."""
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        return 0
    return max(0, int(v))


Captured = tuple[Any, Any, Mapping[str, Any], Any, Any, Any]
"""What must be read on the event loop: (WorkerState, its MemoryState, metrics, nbytes,
last_seen, status). The rest of a WorkerState (address, name, host, threads, limit, nanny)
is fixed when the worker registers; ``metrics`` is replaced whole by each heartbeat, never
changed in place."""


def capture(ws: Any) -> Captured:
    """The changing part of one WorkerState, read on the loop: ``ws.memory`` included."""
    return (ws, ws.memory, ws.metrics, ws.nbytes, ws.last_seen, ws.status)


def read_captured(captured: Captured) -> tuple[WorkerInfo, MemoryBreakdown, dict[Metric, float]]:
    """The exporter's values of one captured WorkerState (off the loop).

    The breakdown is ``ws.memory`` as it is; ``reading`` carries the heartbeat's figures so
    that everything downstream that reads them (``heartbeat_process_bytes``) still can.
    """
    ws, mem, metrics, nbytes, last_seen, status = captured
    metrics = metrics or {}
    spilled = metrics.get("spilled_bytes") or {}
    seen = float(last_seen)
    reading = WorkerReading(
        process=_count(metrics.get("memory", 0)),
        managed_total=_count(nbytes),
        spilled_memory=_count(spilled.get("memory", 0)),
        spilled_disk=_count(spilled.get("disk", 0)),
        heartbeat_time=seen,
    )
    info = WorkerInfo(
        address=str(ws.address),
        name=str(ws.name),
        host=str(ws.host),
        nthreads=int(ws.nthreads or 0),
        memory_limit=int(ws.memory_limit) if ws.memory_limit else None,
        status=status.name,
        last_seen=seen,
        nanny=str(ws.nanny) if ws.nanny else None,
        reading=reading,
    )
    breakdown = MemoryBreakdown(
        process=mem.process,
        managed=mem.managed,
        unmanaged_old=mem.unmanaged_old,
        spilled=mem.spilled,
    )
    values = read_heartbeat(metrics) if HEARTBEAT_GAUGES else {}
    return info, breakdown, values


def _result(captured: list[Captured], skipped: int) -> SourceResult:
    infos: dict[str, WorkerInfo] = {}
    memory: dict[str, MemoryBreakdown] = {}
    values: dict[str, dict[Metric, float]] = {}
    for c in captured:
        try:
            info, breakdown, vals = read_captured(c)
        except Exception as e:
            skipped += 1
            logger.debug("skipping worker: %s", e)
            continue
        infos[info.address] = info
        memory[info.address] = breakdown
        if vals:
            values[info.address] = vals
    return SourceResult(workers=infos, skipped=skipped, values=values, memory=memory)


class SchedulerStateSource:
    """The roster source of the preload: the scheduler's ``WorkerState`` objects, read directly.

    It owns the same heartbeat gauges as ``SchedulerSource`` and uses the same ``source``
    label, so rules and dashboards see no difference. It cannot time out or lose a
    connection; a worker entry it cannot read is skipped and counted, as a malformed
    ``identity`` entry would be.
    """

    name = SOURCE_SCHEDULER
    roster = True
    families: tuple[Metric, ...] = tuple(g.metric for g in HEARTBEAT_GAUGES)
    reasons: tuple[str, ...] = ()

    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler

    async def fetch(self, workers: Mapping[str, WorkerInfo] | None = None) -> SourceResult:
        """Capture every worker's changing state in one pass on the event loop (no await
        inside: one consistent instant), then build the exporter's values in a thread."""
        captured: list[Captured] = []
        skipped = 0
        for ws in list(self.scheduler.workers.values()):
            try:
                captured.append(capture(ws))
            except Exception as e:  # one odd WorkerState never hides the others
                skipped += 1
                logger.debug("skipping worker %r: %s", getattr(ws, "address", ws), e)
        return await asyncio.to_thread(_result, captured, skipped)

    async def close(self) -> None:
        """Nothing to release: the scheduler's state is only read."""
