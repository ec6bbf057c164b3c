"""Outcome panels and annotations: memory restarts by the nanny, workers and tasks lost.

Read from the counters of the events source (``names.OUTCOME_COUNTERS``). The panels draw the
counters themselves, so each restart or loss is a step; the annotations mark the moments.
"""

from __future__ import annotations

from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import timeseries

from .. import names as n
from .panels import DS, target, ts_panel
from .queries import Queries

__all__ = ["lost_annotation", "outcome_panels", "restart_annotation", "worker_restarts_panel"]


def _moments(expr: str, window: str) -> str:
    """Where a counter rose within ``window`` (one annotation per step)."""
    return f"round(increase({expr}[{window}])) > 0"


def restart_annotation(q: Queries, name: str = "Memory restarts") -> db.AnnotationQuery:
    """A mark where the nanny of a selected worker killed it for memory."""
    restarts = f"{n.WORKER_MEMORY_RESTARTS_TOTAL}{q.worker()}"
    return (
        db.AnnotationQuery()
        .name(name)
        .datasource(DS)
        .enable(True)
        .icon_color("dark-red")
        .expr(_moments(restarts, "1m"))
    )


def lost_annotation(q: Queries) -> db.AnnotationQuery:
    """A mark where workers of the selected clusters left unexpectedly (any cause)."""
    return (
        db.AnnotationQuery()
        .name("Workers lost")
        .datasource(DS)
        .enable(True)
        .icon_color("purple")
        .expr(_moments(f"{n.WORKERS_LOST_TOTAL}{q.cluster()}", "1m"))
    )


def outcome_panels(q: Queries) -> list[timeseries.Panel]:
    """The cluster dashboard's "Restarts and lost workers" row."""
    cs = q.cluster()
    return [
        ts_panel(
            "Memory restarts and lost workers",
            "Workers their nanny killed for passing the terminate threshold, by worker name "
            "(since the scheduler started), and workers that left unexpectedly, by cause (since "
            "the exporter started; cause memory_restart is the same kills seen as departures). "
            "Each step is an event; DaskWorkerKilledForMemory and DaskWorkerLostUnexpectedly "
            "fire on them.",
            "none",
        )
        .with_target(
            target(
                f"sum by ({n.LABEL_WORKER_NAME}) ({n.WORKER_MEMORY_RESTARTS_TOTAL}{q.worker()})",
                "A",
                "restarts {{" + n.LABEL_WORKER_NAME + "}}",
            )
        )
        .with_target(
            target(
                f"sum by ({n.LABEL_CAUSE}) ({n.WORKERS_LOST_TOTAL}{cs})",
                "B",
                "lost: {{" + n.LABEL_CAUSE + "}}",
            )
        )
        .decimals(0)
        .height(8)
        .span(12),
        ts_panel(
            "Tasks lost with workers",
            "Tasks on the workers that left unexpectedly: computed results the scheduler "
            "recomputes, scattered data lost for good, tasks that were processing there and "
            "are retried.",
            "none",
        )
        .with_target(
            target(
                f"sum by ({n.LABEL_KIND}) ({n.LOST_TASKS_TOTAL}{cs})",
                "A",
                "{{" + n.LABEL_KIND + "}}",
            )
        )
        .decimals(0)
        .height(8)
        .span(12),
    ]


def worker_restarts_panel(q: Queries) -> timeseries.Panel:
    """The worker dashboard's restart count (the name survives the restart)."""
    return (
        ts_panel(
            "Memory restarts",
            "Times the worker's nanny killed and restarted it for passing the terminate "
            "threshold, since the scheduler started (by worker name, which the restarted worker "
            "keeps). Each step is a kill: look at the memory graph just before it.",
            "none",
        )
        .with_target(
            target(
                f"sum by ({n.LABEL_WORKER_NAME}) ({n.WORKER_MEMORY_RESTARTS_TOTAL}{q.worker()})",
                "A",
                "{{" + n.LABEL_WORKER_NAME + "}}",
            )
        )
        .decimals(0)
        .height(8)
        .span(8)
    )
