"""Per-worker gauges read from the heartbeat's ``metrics``, beyond the memory breakdown.

Every worker's heartbeat carries a ``metrics`` dict that reaches the exporter unchanged in
the scheduler's ``identity`` answer (``Worker.get_metrics``: task counts, event-loop interval,
transfers, custom ``Worker(metrics=...)`` entries …). Each entry of :data:`HEARTBEAT_GAUGES`
declares one family and how to read it from that dict; the scheduler source decodes them
all, and the collector, the landing page and the worker dashboard pick them up from the
declaration. A worker whose heartbeat lacks a key, or carries a value that is not a finite
number, gets no series of that family, never a 0: one odd entry hides nothing else.

Adding a heartbeat family is one entry here, its test, and regenerated dashboards.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .names import Metric, worker_gauge

__all__ = ["HEARTBEAT_GAUGES", "WORKER_EXECUTING_TASKS", "HeartbeatGauge", "read_heartbeat"]


@dataclass(frozen=True, slots=True)
class HeartbeatGauge:
    """One per-worker gauge and how to read it from a heartbeat's ``metrics``."""

    metric: Metric
    read: Callable[[Mapping[str, Any]], Any]
    """Returns the raw value; a KeyError, TypeError or non-number means "not reported"."""


WORKER_EXECUTING_TASKS = worker_gauge(
    "dask_memory_worker_executing_tasks",
    "Tasks executing on the worker at its last heartbeat: their working memory is the "
    "task heap, unmanaged until they finish.",
)

HEARTBEAT_GAUGES: tuple[HeartbeatGauge, ...] = (
    # task_counts counts the worker's tasks by state; a state with no task is absent: 0.
    HeartbeatGauge(WORKER_EXECUTING_TASKS, lambda m: m["task_counts"].get("executing", 0)),
)


def read_heartbeat(
    metrics: Mapping[str, Any], gauges: tuple[HeartbeatGauge, ...] = HEARTBEAT_GAUGES
) -> dict[Metric, float]:
    """The values of every declared gauge this heartbeat reports (finite numbers only)."""
    out: dict[Metric, float] = {}
    for g in gauges:
        try:
            v = g.read(metrics)
        except (KeyError, TypeError, IndexError, AttributeError, ValueError):
            continue
        if isinstance(v, bool) or not isinstance(v, int | float):
            continue
        v = float(v)
        if math.isfinite(v):
            out[g.metric] = v
    return out
