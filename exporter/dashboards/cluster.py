"""The "Dask cluster memory" dashboard."""

from __future__ import annotations

from grafana_foundation_sdk.builders import barchart, statetimeline, table, timeseries
from grafana_foundation_sdk.builders import common as cb
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.models import common as cm
from grafana_foundation_sdk.models import dashboard as dm

from .. import names as n
from ..mixin import MixinConfig
from .gpu import gpu_row, gpu_variable
from .panels import (
    BREAKDOWN,
    CLUSTER_FILE,
    COLORS,
    DS,
    LIMIT,
    PAUSED_MAPPING,
    PROCESS,
    UP_MAPPING,
    WORKER_FILE,
    base_dashboard,
    dashboard_link,
    dashboard_uid,
    fixed_color,
    fixed_thresholds,
    legend_table,
    merge_table,
    prop,
    ref_ids,
    slug,
    stacked_breakdown,
    stat_panel,
    target,
    threshold_ratio_lines,
    tooltip,
    ts_panel,
    value_mappings,
    var_params,
    with_head,
)
from .queries import ALERTNAME_REGEX, FIRING, WORKER_VAR, Queries


# --- the cluster dashboard --------------------------------------------------------------------
def cluster_dashboard(config: MixinConfig) -> db.Dashboard:
    """ "Dask cluster memory": the cluster's memory picture, per worker, alerts, pauses."""
    q = Queries(config)
    cs, ws = q.cluster(), q.worker()
    d = with_head(
        base_dashboard(
            config,
            "Dask cluster memory",
            CLUSTER_FILE,
            "Memory of a Dask cluster's workers as the Dask dashboard shows it (managed, "
            "unmanaged, unmanaged recent, spilled), against each worker's limit and "
            "memory-manager thresholds. From dask-memory-exporter.",
        ).link(dashboard_link("Dask worker memory", WORKER_FILE)),
        q,
        worker_multi=True,
        paused_name="Paused workers",
        alerts_enabled=False,
        alerts_expr=q.alerts(FIRING),
    )

    firing = q.alerts(FIRING)
    workers = q.workers()
    paused = q.paused_workers()
    d = d.with_row(db.Row("Overview"))
    d = d.with_panel(
        stat_panel(
            "Workers", "Workers the scheduler reports, in the selected clusters.", "none", workers
        ).decimals(0)
    )
    d = d.with_panel(
        stat_panel(
            "Paused workers",
            "Workers whose process memory passed the pause threshold: they run no new tasks.",
            "none",
            paused,
        )
        .decimals(0)
        .thresholds(
            db.ThresholdsConfig()
            .mode(dm.ThresholdsMode.ABSOLUTE)
            .steps([dm.Threshold(value=None, color="green"), dm.Threshold(value=1, color="orange")])
        )
    )
    d = d.with_panel(
        stat_panel(
            "Process memory of limit",
            "Process memory of the workers that have a memory limit, as a share of their limits.",
            "percentunit",
            f"sum({n.WORKER_PROCESS_BYTES}{cs} and {n.WORKER_LIMIT_BYTES}{cs}) "
            f"/ sum({n.WORKER_LIMIT_BYTES}{cs})",
        )
    )
    d = d.with_panel(
        stat_panel(
            "Firing alerts",
            f"Firing alerts named {ALERTNAME_REGEX} (the project's rules) for these clusters.",
            "none",
            f"count({firing}) or vector(0)",
        )
        .decimals(0)
        .thresholds(
            db.ThresholdsConfig()
            .mode(dm.ThresholdsMode.ABSOLUTE)
            .steps([dm.Threshold(value=None, color="green"), dm.Threshold(value=1, color="red")])
        )
    )
    d = d.with_panel(
        stat_panel(
            "Scheduler",
            "Whether the exporter's last poll of the scheduler succeeded (worst exporter shown).",
            "none",
            f"min({n.SCHEDULER_UP}{cs})",
        ).mappings(value_mappings(UP_MAPPING))
    )
    d = d.with_panel(
        stat_panel(
            "Oldest heartbeat",
            "Age of the stalest worker heartbeat: a worker whose event loop is blocked stops "
            "sending them, and its memory figures go stale.",
            "s",
            f"max({n.WORKER_HEARTBEAT_AGE_SECONDS}{cs})",
        )
    )
    d = d.with_panel(
        stacked_breakdown(
            q,
            "Cluster memory",
            "All workers together, stacked as in the Dask dashboard: managed (in RAM), "
            "unmanaged (old), unmanaged recent and spilled (on disk; not part of process "
            "memory). Process memory is the sum of the first three. The line is the total of "
            "the memory limits.",
            cs,
            totals=True,
            thresholds=False,
        )
        .height(9)
        .span(12)
    )
    d = d.with_panel(_bars_by_worker(q).height(9).span(12))
    d = d.with_panel(
        threshold_ratio_lines(
            ts_panel(
                "Process memory of limit, per worker",
                "Each worker's process memory as a share of its memory limit; the dashed lines "
                "are the memory manager's thresholds (target: spilling stops; spill: spilling "
                "starts; pause: no new tasks; terminate: the nanny restarts the worker).",
                "percentunit",
            )
            .legend(legend_table(("lastNotNull", "max")))
            .with_target(
                target(
                    q.process_of_limit(),
                    "A",
                    "{{" + n.LABEL_WORKER_NAME + "}}",
                )
            ),
            q,
            ws,
            "B",
        )
        .axis_soft_max(1)
        .height(10)
        .span(12)
    )
    d = d.with_panel(_alerts_table(q).height(10).span(12))
    d = d.with_panel(_worker_table(q, config).height(10).span(24))

    per_worker = (
        stacked_breakdown(
            q,
            f"${WORKER_VAR}",
            "One worker's memory, stacked as in the Dask dashboard, with its limit and "
            "thresholds (target, spill, pause, terminate) as lines.",
            ws,
            totals=False,
            thresholds=True,
        )
        .legend(cb.VizLegendOptions().display_mode(cm.LegendDisplayMode.LIST).show_legend(True))
        .repeat(WORKER_VAR)
        .repeat_direction("h")
        .max_per_row(3)
        .height(8)
        .span(8)
    )
    d = d.with_row(db.Row("Per worker: memory over time").with_panel(per_worker))
    d = d.with_variable(gpu_variable(ws)).with_row(gpu_row(ws, per_worker=False))
    row = db.Row("Exporter")
    for panel in _exporter_panels(q):
        row = row.with_panel(panel)
    return d.with_row(row)


def _bars_by_worker(q: Queries) -> barchart.Panel:
    ws = q.worker()
    refs = ref_ids()
    panel = (
        barchart.Panel()
        .title("Memory by worker, now")
        .description(
            "The Dask dashboard's bar per worker: managed, unmanaged (old), unmanaged recent and "
            "spilled bytes, stacked."
        )
        .datasource(DS)
        .unit("bytes")
        .x_field(n.LABEL_WORKER_NAME)
        .orientation(cm.VizOrientation.HORIZONTAL)
        .stacking(cm.StackingMode.NORMAL)
        .show_value(cm.VisibilityMode.NEVER)
        .fill_opacity(80)
        .legend(cb.VizLegendOptions().display_mode(cm.LegendDisplayMode.LIST).show_legend(True))
        .tooltip(tooltip())
    )
    rename: dict[str, str] = {}
    for legend, metric in BREAKDOWN:
        ref = next(refs)
        panel = panel.with_target(
            target(f"max by ({q.by_worker}) ({metric}{ws})", ref, instant=True)
        ).override_by_name(legend, [fixed_color(COLORS[legend])])
        rename[f"Value #{ref}"] = legend
    excluded = (n.LABEL_WORKER, *q.c.cluster_labels)
    return panel.transformations(merge_table(rename, q.c.cluster_labels, excluded))


def _worker_table(q: Queries, config: MixinConfig) -> table.Panel:
    ws = q.worker()
    by = q.by_worker
    share = "share of limit"
    heartbeat = "heartbeat age"
    paused = "paused"
    columns = [
        (PROCESS, f"max by ({by}) ({n.WORKER_PROCESS_BYTES}{ws})"),
        *((legend, f"max by ({by}) ({metric}{ws})") for legend, metric in BREAKDOWN),
        (LIMIT, f"max by ({by}) ({n.WORKER_LIMIT_BYTES}{ws})"),
        (
            share,
            f"max by ({by}) ({n.WORKER_PROCESS_BYTES}{ws}) "
            f"/ max by ({by}) ({n.WORKER_LIMIT_BYTES}{ws})",
        ),
        (paused, f"max by ({by}) ({n.WORKER_PAUSED}{ws})"),
        (heartbeat, f"max by ({by}) ({n.WORKER_HEARTBEAT_AGE_SECONDS}{ws})"),
    ]
    refs = ref_ids()
    panel = (
        table.Panel()
        .title("Worker table")
        .description(
            "One row per worker, now; click a header to sort, a worker name to open it in the "
            "worker dashboard. Unmanaged (old) is the minimum of unmanaged memory over the last "
            "recent-to-old-time (30 s by default); unmanaged recent is the rest."
        )
        .datasource(DS)
        .unit("bytes")
        .thresholds(fixed_thresholds())
        .sort_by([cb.TableSortByFieldState().display_name(PROCESS).desc(True)])
        .filterable(False)
    )
    rename: dict[str, str] = {}
    for legend, expr in columns:
        ref = next(refs)
        panel = panel.with_target(target(expr, ref, instant=True))
        rename[f"Value #{ref}"] = legend
    for legend, _ in BREAKDOWN:
        panel = panel.override_by_name(legend, [fixed_color(COLORS[legend])])
    worker_url = (
        f"/d/{dashboard_uid(WORKER_FILE)}/{slug(WORKER_FILE)}"
        f"?var-{WORKER_VAR}=${{__value.raw}}&{var_params(config)}&${{__url_time_range}}"
    )
    panel = (
        panel.override_by_name(
            n.LABEL_WORKER_NAME,
            [prop("links", [{"title": "Worker memory", "url": worker_url}])],
        )
        .override_by_name(
            share,
            [
                prop("unit", "percentunit"),
                prop("max", 1),
                prop("min", 0),
                prop("custom.cellOptions", {"type": "gauge", "mode": "basic"}),
                prop("color", {"mode": "continuous-GrYlRd"}),
            ],
        )
        .override_by_name(
            paused,
            [
                prop("unit", "none"),
                prop("mappings", value_mappings(PAUSED_MAPPING)),
                prop("custom.cellOptions", {"type": "color-text"}),
            ],
        )
        .override_by_name(heartbeat, [prop("unit", "s"), prop("decimals", 1)])
    )
    return panel.transformations(merge_table(rename, q.c.cluster_labels))


def _alerts_table(q: Queries) -> table.Panel:
    return (
        table.Panel()
        .title("Alert list")
        .description(
            f"Alerts named {ALERTNAME_REGEX} (docs/runbooks.md has a section for each) firing "
            "now for these clusters, from Prometheus' ALERTS series."
        )
        .datasource(DS)
        .with_target(
            target(
                f"max by (alertname, severity, {q.by_worker}) ({q.alerts(FIRING)})",
                "A",
                instant=True,
            )
        )
        .no_value("no alerts firing")
        .transformations(
            [
                dm.DataTransformerConfig(
                    id_val="organize",
                    options={
                        "excludeByName": {"Time": True, "Value": True},
                        "indexByName": {
                            name: i
                            for i, name in enumerate(
                                (
                                    "alertname",
                                    "severity",
                                    n.LABEL_WORKER_NAME,
                                    n.LABEL_WORKER,
                                    *q.c.cluster_labels,
                                )
                            )
                        },
                        "renameByName": {},
                    },
                )
            ]
        )
    )


def _exporter_panels(q: Queries) -> list[timeseries.Panel | statetimeline.Panel]:
    cs = q.cluster()
    instance = "{{instance}}"
    return [
        statetimeline.Panel()
        .title("Scheduler and sources")
        .description(
            "Whether the exporter's polls of the scheduler succeed, and each data source "
            "(scheduler; local: the sidecar's direct RSS) in the last poll."
        )
        .datasource(DS)
        .with_target(target(f"{n.SCHEDULER_UP}{cs}", "A", "scheduler reachable " + instance))
        .with_target(
            target(
                f"{n.EXPORTER_SOURCE_SUCCESS}{cs}",
                "B",
                "{{" + n.LABEL_SOURCE + "}} source " + instance,
            )
        )
        .mappings(value_mappings(UP_MAPPING))
        .thresholds(fixed_thresholds())
        .height(6)
        .span(12),
        ts_panel("Poll duration", "Wall time of the exporter's last poll of the scheduler.", "s")
        .with_target(target(f"{n.EXPORTER_POLL_DURATION_SECONDS}{cs}", "A", instance))
        .height(6)
        .span(12),
        ts_panel(
            "Source errors",
            "Failed fetches per second of each source (the scheduler, the local processes) by "
            "cause (refused, dns, timeout, tls …), and worker entries skipped as malformed.",
            "short",
        )
        .with_target(
            target(
                f"rate({n.EXPORTER_SOURCE_ERRORS_TOTAL}{cs}[$__rate_interval])",
                "A",
                "{{source}} {{reason}} errors/s " + instance,
            )
        )
        .with_target(
            target(f"{n.EXPORTER_SKIPPED_WORKERS}{cs}", "B", "skipped workers " + instance)
        )
        .height(6)
        .span(12),
        ts_panel(
            "Time since last successful poll",
            "How stale the worker figures are: seconds since the exporter last polled the "
            "scheduler successfully.",
            "s",
        )
        .with_target(
            target(f"time() - {n.EXPORTER_LAST_SUCCESS_TIMESTAMP_SECONDS}{cs}", "A", instance)
        )
        .height(6)
        .span(12),
    ]
