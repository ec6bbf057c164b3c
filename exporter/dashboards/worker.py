"""The "Dask worker memory" dashboard."""

from __future__ import annotations

from grafana_foundation_sdk.builders import common as cb
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import statetimeline
from grafana_foundation_sdk.models import common as cm
from grafana_foundation_sdk.models import dashboard as dm

from .. import names as n
from ..heartbeat import GPU_GAUGES, HEARTBEAT_GAUGES
from ..mixin import MixinConfig
from ..rules import duration_seconds
from .gpu import gpu_row, gpu_variable
from .panels import (
    CLUSTER_FILE,
    DS,
    PAUSED_MAPPING,
    WORKER_FILE,
    base_dashboard,
    dashboard_link,
    fixed_thresholds,
    stacked_breakdown,
    stat_panel,
    target,
    threshold_ratio_lines,
    ts_panel,
    value_mappings,
    with_head,
)
from .queries import FIRING, Queries


# --- the worker dashboard ---------------------------------------------------------------------
def worker_dashboard(config: MixinConfig) -> db.Dashboard:
    """ "Dask worker memory": one worker over time."""
    q = Queries(config)
    ws = q.worker()
    d = with_head(
        base_dashboard(
            config,
            "Dask worker memory",
            WORKER_FILE,
            "One Dask worker's memory over time against its limit and thresholds, its process "
            "memory by source, paused state and heartbeat age. From dask-memory-exporter.",
        ).link(dashboard_link("Dask cluster memory", CLUSTER_FILE)),
        q,
        worker_multi=False,
        paused_name="Paused",
        alerts_enabled=True,
        alerts_expr=q.alerts(FIRING, q.worker_matcher),
    )
    d = d.with_row(db.Row("$worker"))
    d = d.with_panel(
        stat_panel(
            "Process memory",
            "The worker's RSS: as its heartbeat reports it, or as read from the OS in the "
            "sidecar modes.",
            "bytes",
            f"max({n.WORKER_PROCESS_BYTES}{ws})",
        )
    )
    d = d.with_panel(
        stat_panel(
            "Share of limit",
            "Process memory as a share of the memory limit.",
            "percentunit",
            f"max({n.WORKER_PROCESS_BYTES}{ws} / {n.WORKER_LIMIT_BYTES}{ws})",
        )
    )
    d = d.with_panel(
        stat_panel(
            "Memory limit",
            "The worker's memory_limit.",
            "bytes",
            f"max({n.WORKER_LIMIT_BYTES}{ws})",
        )
    )
    d = d.with_panel(
        stat_panel(
            "Spilled",
            "Managed data spilled to disk.",
            "bytes",
            f"max({n.WORKER_SPILLED_BYTES}{ws})",
        )
    )
    d = d.with_panel(
        stat_panel(
            "Status",
            "Paused above the pause threshold: no new tasks.",
            "none",
            f"max({n.WORKER_PAUSED}{ws})",
        )
        .mappings(value_mappings(PAUSED_MAPPING))
        .graph_mode(cm.BigValueGraphMode.NONE)
    )
    d = d.with_panel(
        stat_panel(
            "Last heartbeat",
            "Seconds since the scheduler last heard from the worker.",
            "s",
            f"max({n.WORKER_HEARTBEAT_AGE_SECONDS}{ws})",
        )
    )
    d = d.with_panel(
        stacked_breakdown(
            q,
            "Memory",
            "Managed (in RAM), unmanaged (old), unmanaged recent and spilled (on disk) stacked as "
            "in the Dask dashboard; the lines are the limit and the memory manager's thresholds "
            "in bytes. After a restart the worker has a new address but the same name.",
            ws,
            totals=False,
            thresholds=True,
        )
        .height(10)
        .span(24)
    )
    d = d.with_panel(
        threshold_ratio_lines(
            ts_panel(
                "Process memory of limit",
                "Process memory as a share of the memory limit, with the thresholds.",
                "percentunit",
            ).with_target(
                target(
                    q.process_of_limit(),
                    "A",
                    "{{" + n.LABEL_WORKER + "}}",
                )
            ),
            q,
            ws,
            "B",
        )
        .axis_soft_max(1)
        .height(8)
        .span(12)
    )
    d = d.with_panel(
        ts_panel(
            "Process memory by source",
            "Process memory (in the sidecar modes, --mode local or both, the worker's RSS read "
            "directly from the operating system) against the process memory of the worker's last "
            "heartbeat, as the scheduler last heard it. They part while the worker's event loop "
            "is blocked: the heartbeat figure freezes while the direct RSS keeps moving. The "
            "heartbeat series exists only in the sidecar modes; in scheduler mode process memory "
            "is the heartbeat's figure.",
            "bytes",
        )
        .with_target(target(f"{n.WORKER_PROCESS_BYTES}{ws}", "A", "process {{worker}}"))
        .with_target(
            target(f"{n.WORKER_HEARTBEAT_PROCESS_BYTES}{ws}", "B", "last heartbeat {{worker}}")
        )
        .height(8)
        .span(12)
    )
    d = d.with_panel(
        ts_panel(
            "Unmanaged (old) memory growth",
            f"Growth rate of unmanaged (old) memory over {config.pause_predicted_window} (the "
            "window DaskWorkerPausePredicted uses). Steadily positive: a leak, or memory the "
            "allocator keeps.",
            "Bps",
            floor=False,  # shrinking is negative
        )
        .with_target(
            target(
                f"deriv({n.WORKER_UNMANAGED_BYTES}{ws}[{config.pause_predicted_window}])",
                "A",
                "{{" + n.LABEL_WORKER + "}}",
            )
        )
        .height(8)
        .span(8)
    )
    d = d.with_panel(
        statetimeline.Panel()
        .title("Paused")
        .description("Running or paused (process memory above the pause threshold).")
        .datasource(DS)
        .with_target(target(f"{n.WORKER_PAUSED}{ws}", "A", "{{" + n.LABEL_WORKER + "}}"))
        .mappings(value_mappings(PAUSED_MAPPING))
        .thresholds(fixed_thresholds())
        .height(8)
        .span(8)
    )
    stale = duration_seconds(config.heartbeat_stale_after)
    d = d.with_panel(
        ts_panel(
            "Heartbeat age",
            f"Seconds since the scheduler last heard from the worker; the line is "
            f"{config.heartbeat_stale_after}, where DaskWorkerHeartbeatStale starts counting.",
            "s",
        )
        .with_target(
            target(f"{n.WORKER_HEARTBEAT_AGE_SECONDS}{ws}", "A", "{{" + n.LABEL_WORKER + "}}")
        )
        .thresholds(
            db.ThresholdsConfig()
            .mode(dm.ThresholdsMode.ABSOLUTE)
            .steps(
                [dm.Threshold(value=None, color="green"), dm.Threshold(value=stale, color="red")]
            )
        )
        .thresholds_style(cb.GraphThresholdsStyleConfig().mode(cm.GraphThresholdsStyleMode.DASHED))
        .height(8)
        .span(8)
    )
    d = _heartbeat_row(d, ws)
    return d.with_variable(gpu_variable(ws)).with_row(gpu_row(ws, per_worker=True))


UNITS = {"bytes": "bytes", "seconds": "s", "ratio": "percentunit", "": "short"}
"""Grafana's unit for each base unit a Metric may declare."""


def _heartbeat_row(d: db.Dashboard, ws: str) -> db.Dashboard:
    """One panel per gauge of ``heartbeat.HEARTBEAT_GAUGES``, built from its declaration
    alone: a family added there shows here after ``generate dashboards``. The GPU families
    have their own row (``gpu.py``)."""
    gauges = [g for g in HEARTBEAT_GAUGES if g not in GPU_GAUGES]
    if not gauges:
        return d
    d = d.with_row(db.Row("Heartbeat figures"))
    for g in gauges:
        m = g.metric
        d = d.with_panel(
            ts_panel(m.heading, m.help, UNITS[m.unit])
            .with_target(target(f"{m}{ws}", "A", "{{" + n.LABEL_WORKER + "}}"))
            .height(8)
            .span(8)
        )
    return d
