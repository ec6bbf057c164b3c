"""SchedulerStateSource: the roster read from the scheduler's own state, inside its process.

When the exporter runs as a scheduler preload (``preload.py``) there is nothing to poll:
``Scheduler.workers`` holds every ``WorkerState``, and ``WorkerState.memory`` is the exact
breakdown the Dask dashboard draws, the scheduler's own sliding window of unmanaged memory
included. This source copies what the exporter needs out of those objects into plain, frozen
``WorkerInfo`` values and a ready ``MemoryBreakdown`` per worker; the rest of the pipeline
(snapshot, collector, HTTP) is the same as for a polled scheduler.

The scheduler mutates its state on its event loop and nowhere else, so the copy is made on the
loop, in one synchronous pass with no await in it: a consistent view, and the only part of the
exporter's work that must hold the scheduler's loop. It is a few microseconds per worker
(``benchmarks/preload_cost.py``); rendering happens later, in a thread.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

from .heartbeat import HEARTBEAT_GAUGES, read_heartbeat
from .memory import MemoryBreakdown, WorkerReading
from .names import SOURCE_SCHEDULER, Metric
from .source import SourceResult, WorkerInfo

__all__ = ["SchedulerStateSource", "read_worker_state"]

logger = logging.getLogger(__name__)


def _count(v: Any) -> int:
    """A byte count from the scheduler's state; anything else (a broken heartbeat) is 0."""
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        return 0
    return max(0, int(v))


def read_worker_state(ws: Any) -> tuple[WorkerInfo, MemoryBreakdown, dict[Metric, float]]:
    """One ``distributed.scheduler.WorkerState`` as the exporter's values.

    The breakdown is ``ws.memory`` as it is; ``reading`` carries the heartbeat's figures so
    that everything downstream that reads them (``heartbeat_process_bytes``) still can.
    """
    mem = ws.memory  # MemoryState, built on access from nbytes, metrics and the window
    metrics = ws.metrics or {}
    spilled = metrics.get("spilled_bytes") or {}
    last_seen = float(ws.last_seen)
    reading = WorkerReading(
        process=_count(metrics.get("memory", 0)),
        managed_total=_count(ws.nbytes),
        spilled_memory=_count(spilled.get("memory", 0)),
        spilled_disk=_count(spilled.get("disk", 0)),
        heartbeat_time=last_seen,
    )
    info = WorkerInfo(
        address=str(ws.address),
        name=str(ws.name),
        host=str(ws.host),
        nthreads=int(ws.nthreads or 0),
        memory_limit=int(ws.memory_limit) if ws.memory_limit else None,
        status=ws.status.name,
        last_seen=last_seen,
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
        """Copy every worker's state in one pass on the event loop (no await inside)."""
        infos: dict[str, WorkerInfo] = {}
        memory: dict[str, MemoryBreakdown] = {}
        values: dict[str, dict[Metric, float]] = {}
        skipped = 0
        for ws in list(self.scheduler.workers.values()):
            try:
                info, breakdown, vals = read_worker_state(ws)
            except Exception as e:  # one odd WorkerState never hides the others
                skipped += 1
                logger.debug("skipping worker %r: %s", getattr(ws, "address", ws), e)
                continue
            infos[info.address] = info
            memory[info.address] = breakdown
            if vals:
                values[info.address] = vals
        return SourceResult(workers=infos, skipped=skipped, values=values, memory=memory)

    async def close(self) -> None:
        """Nothing to release: the scheduler's state is only read."""
