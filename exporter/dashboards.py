"""Grafana dashboards as code (grafana-foundation-sdk), rendered from a :class:`MixinConfig`.

Covers the two dashboards committed under ``grafana/dashboards/`` and their provisioning
examples under ``grafana/provisioning/``:

``dask-cluster-memory.json`` ("Dask cluster memory")
    The Dask dashboard's memory picture in Grafana: managed (solid), unmanaged (lighter),
    unmanaged recent (lighter still) and spilled (grey) stacked, for the cluster and per worker;
    each worker's process memory against its limit with the target, spill, pause and terminate
    levels; a sortable worker table; the project's firing alerts; paused workers as annotations.
``dask-worker-memory.json`` ("Dask worker memory")
    One worker (template variable ``worker``, by ``worker_name``, which survives restarts) over
    time with its thresholds, process memory by source (scheduler heartbeat versus the sidecar's
    direct RSS), paused state and heartbeat age.

Pure and deterministic: metric names come from :mod:`dask_memory_exporter.names` (and
recorded series from :mod:`dask_memory_exporter.rules`), selectors, tags, refresh and time
range from the MixinConfig.
Thresholds are never constants here: they are drawn from the exporter's
``dask_memory_worker_threshold_ratio`` and ``dask_memory_worker_limit_bytes`` series.

Import and provisioning: every panel uses the data source variable ``datasource``. Its
current value is ``${DS_PROMETHEUS}``, the one entry of ``__inputs``, so importing through
Grafana's UI asks for a Prometheus data source and pre-selects it; a provisioned copy (file
provider or the Helm chart's sidecar) leaves it unresolved and Grafana falls back to the
default Prometheus data source. The cluster-label variables (``cluster_labels``: namespace,
job, instance by default) default to All (``.*``), which also matches series without that
label. Uids are derived from the file name, so links between the dashboards stay stable.

What it does not cover: alert rules (``rules.py``), Kubernetes manifests (``deploy/``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from typing import Any

import yaml
from grafana_foundation_sdk.builders import barchart, stat, statetimeline, table, timeseries
from grafana_foundation_sdk.builders import common as cb
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import prometheus as pb
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as cm
from grafana_foundation_sdk.models import dashboard as dm
from grafana_foundation_sdk.models import prometheus as pm

from . import names as n
from .mixin import MixinConfig
from .rules import CLUSTER_PAUSED_WORKERS, CLUSTER_WORKERS, cluster_sum, duration_seconds

__all__ = [
    "ALERTNAME_REGEX",
    "CLUSTER_FILE",
    "CONFIGMAP_NAME",
    "DATASOURCE_INPUT",
    "WORKER_FILE",
    "cluster_dashboard",
    "dashboard_uid",
    "render_configmap",
    "render_files",
    "render_provider",
    "render_provisioning",
    "worker_dashboard",
]

CLUSTER_FILE = "dask-cluster-memory.json"
WORKER_FILE = "dask-worker-memory.json"
CONFIGMAP_NAME = "dask-memory-dashboards"
DATASOURCE_INPUT = "DS_PROMETHEUS"
ALERTNAME_REGEX = "Dask.*"
"""Every alert of exporter/rules.py is named Dask...; the alerts panels select them by this."""
FIRING = 'alertstate="firing"'

GRAFANA_VERSION = "11.6.0"
"""The Grafana build whose schema the SDK emits (schemaVersion 41); ``__requires`` names it."""

DS_VAR = "datasource"
WORKER_VAR = "worker"
DS = dm.DataSourceRef(type_val="prometheus", uid="${" + DS_VAR + "}")

# The Dask dashboard's palette: managed solid, unmanaged lighter, recent lighter, spilled grey.
MANAGED, UNMANAGED, RECENT, SPILLED = "managed", "unmanaged (old)", "unmanaged recent", "spilled"
PROCESS, LIMIT = "process", "limit"
COLORS = {
    MANAGED: "blue",
    UNMANAGED: "light-blue",
    RECENT: "super-light-blue",
    SPILLED: "#8c8c8c",
    LIMIT: "text",
    n.THRESHOLD_TARGET: "green",
    n.THRESHOLD_SPILL: "yellow",
    n.THRESHOLD_PAUSE: "orange",
    n.THRESHOLD_TERMINATE: "red",
}
BREAKDOWN = (
    (MANAGED, n.WORKER_MANAGED_BYTES),
    (UNMANAGED, n.WORKER_UNMANAGED_BYTES),
    (RECENT, n.WORKER_UNMANAGED_RECENT_BYTES),
    (SPILLED, n.WORKER_SPILLED_BYTES),
)
ANNOTATION_STEP = "15s"
"""Minimum step of annotation queries (Grafana widens it for long ranges); shorter pauses than
this can be missed."""
ANNOTATION_FORMATS = {  # annotation name -> (titleFormat, tagKeys)
    "Paused workers": ("{{worker_name}} paused", n.LABEL_WORKER_NAME),
    "Paused": ("{{worker_name}} paused", n.LABEL_WORKER_NAME),
    "Dask alerts": ("{{alertname}}", f"alertname,severity,{n.LABEL_WORKER_NAME}"),
}
PAUSED_MAPPING = {"0": ("running", "green"), "1": ("paused", "orange")}
UP_MAPPING = {"0": ("unreachable", "red"), "1": ("reachable", "green")}


def dashboard_uid(file_name: str) -> str:
    """Stable uid of a dashboard: the md5 of its file name (as kubernetes-mixin does)."""
    return hashlib.md5(file_name.encode(), usedforsecurity=False).hexdigest()


def _slug(file_name: str) -> str:
    return file_name.removesuffix(".json")


# --- PromQL ------------------------------------------------------------------------------
class _Sel:
    """Selectors for one MixinConfig: exporter selector + cluster-label (+ worker) variables."""

    def __init__(self, config: MixinConfig) -> None:
        self.c = config
        clash = {DS_VAR, WORKER_VAR} & set(config.cluster_labels)
        if clash:
            raise ValueError(f"cluster_labels may not use the variable names {sorted(clash)}")
        self.cluster_matchers = [f'{label}=~"${label}"' for label in config.cluster_labels]
        self.worker_matcher = f'{n.LABEL_WORKER_NAME}=~"${WORKER_VAR}"'

    def cluster(self, *extra: str) -> str:
        """``{exporter selector, cluster-label variables, extra}``."""
        return self.c.selector(*self.cluster_matchers, *extra)

    def worker(self, *extra: str) -> str:
        """As :meth:`cluster`, restricted to the ``worker`` variable."""
        return self.cluster(self.worker_matcher, *extra)

    @property
    def by_worker(self) -> str:
        """Grouping that keeps one row per worker (and cluster) in table queries."""
        return ", ".join((*self.c.cluster_labels, n.LABEL_WORKER, n.LABEL_WORKER_NAME))

    def threshold_ratio(self, sel: str) -> str:
        return n.WORKER_THRESHOLD_RATIO + sel

    def threshold_bytes(self, sel: str) -> str:
        """Each threshold in bytes per worker (limit x ratio), label ``threshold`` kept."""
        return (
            f"{n.WORKER_LIMIT_BYTES}{sel} * ignoring({n.LABEL_THRESHOLD}) group_right "
            f"{n.WORKER_THRESHOLD_RATIO}{sel}"
        )

    @property
    def recorded(self) -> str:
        """Selector for the per-cluster recorded series. They keep only the cluster labels, so
        the exporter selector (which may match on other labels) is already applied by the rule.
        """
        return "{" + ", ".join(self.cluster_matchers) + "}"

    def cluster_total(self, metric: str) -> str:
        """Total of a per-worker family over the selected clusters."""
        if self.c.dashboard_recording_rules:
            return f"sum({cluster_sum(metric)}{self.recorded})"
        return f"sum({metric}{self.cluster()})"

    def alerts(self, *extra: str) -> str:
        return "ALERTS" + self.cluster(f'alertname=~"{ALERTNAME_REGEX}"', *extra)


# --- small builders -------------------------------------------------------------------------
def _q(expr: str, ref: str, legend: str = "", instant: bool = False) -> pb.Dataquery:
    q = pb.Dataquery().expr(expr).ref_id(ref).datasource(DS)
    if instant:
        q = q.instant().format(pm.PromQueryFormat.TABLE)
    else:
        q = q.range()
        if legend:
            q = q.legend_format(legend)
    return q


def _refs() -> Iterator[str]:
    return iter("ABCDEFGHIJKLMNOPQRSTUVWXYZ")


def _color(color: str) -> dm.DynamicConfigValue:
    return dm.DynamicConfigValue(id_val="color", value={"mode": "fixed", "fixedColor": color})


def _prop(id_val: str, value: Any) -> dm.DynamicConfigValue:
    return dm.DynamicConfigValue(id_val=id_val, value=value)


def _line(color: str, dash: bool = True) -> list[dm.DynamicConfigValue]:
    """An unstacked, unfilled (dashed) line: limits and thresholds over a stacked area."""
    props = [
        _color(color),
        _prop("custom.stacking", {"mode": "none", "group": "A"}),
        _prop("custom.fillOpacity", 0),
        _prop("custom.lineWidth", 2),
    ]
    if dash:
        props.append(_prop("custom.lineStyle", {"fill": "dash", "dash": [10, 10]}))
    return props


def _mappings(table_: dict[str, tuple[str, str]]) -> list[dm.ValueMapping]:
    return [
        dm.ValueMap(
            options={
                value: dm.ValueMappingResult(text=text, color=color, index=i)
                for i, (value, (text, color)) in enumerate(table_.items())
            }
        )
    ]


def _fixed_thresholds(color: str = "text") -> db.ThresholdsConfig:
    return (
        db.ThresholdsConfig()
        .mode(dm.ThresholdsMode.ABSOLUTE)
        .steps([dm.Threshold(value=None, color=color)])
    )


def _legend_table(calcs: Sequence[str] = ("lastNotNull", "max")) -> cb.VizLegendOptions:
    return (
        cb.VizLegendOptions()
        .display_mode(cm.LegendDisplayMode.TABLE)
        .placement(cm.LegendPlacement.BOTTOM)
        .show_legend(True)
        .calcs(list(calcs))
    )


def _tooltip() -> cb.VizTooltipOptions:
    return cb.VizTooltipOptions().mode(cm.TooltipDisplayMode.MULTI).sort(cm.SortOrder.DESCENDING)


def _ts(title: str, description: str, unit: str, floor: bool = True) -> timeseries.Panel:
    panel = timeseries.Panel().title(title).description(description).datasource(DS).unit(unit)
    if floor:
        panel = panel.min(0)
    return (
        panel.line_width(1)
        .fill_opacity(0)
        .show_points(cm.VisibilityMode.NEVER)
        .legend(_legend_table())
        .tooltip(_tooltip())
    )


def _stat(title: str, description: str, unit: str, expr: str) -> stat.Panel:
    return (
        stat.Panel()
        .title(title)
        .description(description)
        .datasource(DS)
        .unit(unit)
        .with_target(_q(expr, "A", legend=title))
        .reduce_options(cb.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
        .color_mode(cm.BigValueColorMode.VALUE)
        .graph_mode(cm.BigValueGraphMode.AREA)
        .thresholds(_fixed_thresholds())
        .height(4)
        .span(4)
    )


def _stacked_breakdown(
    q: _Sel, title: str, description: str, sel: str, totals: bool, thresholds: bool
) -> timeseries.Panel:
    """Managed / unmanaged / recent / spilled stacked, with the limit (and thresholds) as lines."""
    refs = _refs()
    panel = (
        _ts(title, description, "bytes")
        .fill_opacity(70)
        .stacking(cb.StackingConfig().mode(cm.StackingMode.NORMAL).group("A"))
    )
    for legend, metric in BREAKDOWN:
        expr = q.cluster_total(metric) if totals else f"sum({metric}{sel})"
        panel = panel.with_target(_q(expr, next(refs), legend))
        panel = panel.override_by_name(legend, [_color(COLORS[legend])])
    limit = q.cluster_total(n.WORKER_LIMIT_BYTES) if totals else f"sum({n.WORKER_LIMIT_BYTES}{sel})"
    panel = panel.with_target(_q(limit, next(refs), LIMIT))
    panel = panel.override_by_name(LIMIT, _line(COLORS[LIMIT], dash=False))
    if thresholds:
        expr = f"max by ({n.LABEL_THRESHOLD}) ({q.threshold_bytes(sel)})"
        panel = panel.with_target(_q(expr, next(refs), "{{" + n.LABEL_THRESHOLD + "}}"))
        for t in n.THRESHOLDS:
            panel = panel.override_by_name(t, _line(COLORS[t]))
    return panel


def _threshold_ratio_lines(
    panel: timeseries.Panel, q: _Sel, sel: str, ref: str
) -> timeseries.Panel:
    expr = f"max by ({n.LABEL_THRESHOLD}) ({q.threshold_ratio(sel)})"
    panel = panel.with_target(_q(expr, ref, "{{" + n.LABEL_THRESHOLD + "}}"))
    for t in n.THRESHOLDS:
        panel = panel.override_by_name(t, _line(COLORS[t]))
    return panel


def _merge_table(
    rename: dict[str, str], labels: Sequence[str], exclude: Sequence[str] = ()
) -> list[dm.DataTransformerConfig]:
    """Join instant table queries into one row per label set; name and order the columns."""
    order = [n.LABEL_WORKER_NAME, n.LABEL_WORKER, *rename.values(), *labels]
    return [
        dm.DataTransformerConfig(id_val="merge", options={}),
        dm.DataTransformerConfig(
            id_val="organize",
            options={
                "excludeByName": {name: True for name in ("Time", "__name__", *exclude)},
                "indexByName": {name: i for i, name in enumerate(order)},
                "renameByName": rename,
            },
        ),
    ]


# --- variables --------------------------------------------------------------------------------
def _variables(q: _Sel, worker_multi: bool) -> list[db.QueryVariable | db.DatasourceVariable]:
    out: list[db.QueryVariable | db.DatasourceVariable] = [
        db.DatasourceVariable(DS_VAR)
        .label("Data source")
        .type("prometheus")
        .allow_custom_value(False)
        .current(
            dm.VariableOption(
                selected=True,
                text="${" + DATASOURCE_INPUT + "}",
                value="${" + DATASOURCE_INPUT + "}",
            )
        )
    ]
    matchers: list[str] = []
    for label in q.c.cluster_labels:
        sel = q.c.selector(*matchers)
        out.append(
            db.QueryVariable(label)
            .label(label)
            .datasource(DS)
            .query(f"label_values({n.SCHEDULER_UP}{sel}, {label})")
            .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(dm.VariableSort.ALPHABETICAL_ASC)
            .include_all(True)
            .all_value(".*")
            .current(dm.VariableOption(selected=True, text="All", value="$__all"))
        )
        matchers.append(f'{label}=~"${label}"')
    worker = (
        db.QueryVariable(WORKER_VAR)
        .label("worker")
        .description("Worker name (worker_name label), stable across restarts of the worker")
        .datasource(DS)
        .query(f"label_values({n.WORKER_PROCESS_BYTES}{q.cluster()}, {n.LABEL_WORKER_NAME})")
        .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(dm.VariableSort.ALPHABETICAL_ASC)
    )
    if worker_multi:
        worker = (
            worker.multi(True)
            .include_all(True)
            .all_value(".*")
            .current(dm.VariableOption(selected=True, text="All", value="$__all"))
        )
    out.append(worker)
    return out


def _var_params(config: MixinConfig) -> str:
    """URL parameters carrying the data source and cluster variables to the other dashboard."""
    return "&".join(f"${{{v}:queryparam}}" for v in (DS_VAR, *config.cluster_labels))


def _link(title: str, file_name: str) -> db.DashboardLink:
    return (
        db.DashboardLink(title)
        .type(dm.DashboardLinkType.LINK)
        .url(f"/d/{dashboard_uid(file_name)}/{_slug(file_name)}")
        .icon("dashboard")
        .include_vars(True)
        .keep_time(True)
        .target_blank(False)
        .as_dropdown(False)
        .tooltip("")
        .tags([])
    )


def _base(config: MixinConfig, title: str, file_name: str, description: str) -> db.Dashboard:
    return (
        db.Dashboard(title)
        .uid(dashboard_uid(file_name))
        .description(description)
        .tags(list(config.dashboard_tags))
        .refresh(config.dashboard_refresh)
        .time(config.dashboard_time_from, "now")
        .timezone("browser")
        .tooltip(dm.DashboardCursorSync.CROSSHAIR)
        .editable()
    )


def _with_head(
    d: db.Dashboard,
    q: _Sel,
    *,
    worker_multi: bool,
    paused_name: str,
    alerts_enabled: bool,
    alerts_expr: str,
) -> db.Dashboard:
    """What both dashboards start with: variables, and annotations for pauses and alerts."""
    for v in _variables(q, worker_multi=worker_multi):
        d = d.with_variable(v)
    return (
        d.annotation(_builtin_annotation())
        .annotation(
            db.AnnotationQuery()
            .name(paused_name)
            .datasource(DS)
            .enable(True)
            .icon_color("orange")
            .expr(f"max by ({n.LABEL_WORKER_NAME}) ({n.WORKER_PAUSED}{q.worker()}) == 1")
        )
        .annotation(
            db.AnnotationQuery()
            .name("Dask alerts")
            .datasource(DS)
            .enable(alerts_enabled)
            .icon_color("red")
            .expr(alerts_expr)
        )
    )


# --- the cluster dashboard --------------------------------------------------------------------
def cluster_dashboard(config: MixinConfig) -> db.Dashboard:
    """ "Dask cluster memory": the cluster's memory picture, per worker, alerts, pauses."""
    q = _Sel(config)
    cs, ws = q.cluster(), q.worker()
    d = _with_head(
        _base(
            config,
            "Dask cluster memory",
            CLUSTER_FILE,
            "Memory of a Dask cluster's workers as the Dask dashboard shows it (managed, "
            "unmanaged, unmanaged recent, spilled), against each worker's limit and "
            "memory-manager thresholds. From dask-memory-exporter.",
        ).link(_link("Dask worker memory", WORKER_FILE)),
        q,
        worker_multi=True,
        paused_name="Paused workers",
        alerts_enabled=False,
        alerts_expr=q.alerts(FIRING),
    )

    firing = q.alerts(FIRING)
    workers = (
        f"sum({CLUSTER_WORKERS}{q.recorded})"
        if config.dashboard_recording_rules
        else f"count({n.WORKER_PROCESS_BYTES}{cs})"
    )
    paused = (
        f"sum({CLUSTER_PAUSED_WORKERS}{q.recorded})"
        if config.dashboard_recording_rules
        else f"sum({n.WORKER_PAUSED}{cs})"
    )
    d = d.with_row(db.Row("Overview"))
    d = d.with_panel(
        _stat(
            "Workers", "Workers the scheduler reports, in the selected clusters.", "none", workers
        ).decimals(0)
    )
    d = d.with_panel(
        _stat(
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
        _stat(
            "Process memory of limit",
            "Process memory of the workers that have a memory limit, as a share of their limits.",
            "percentunit",
            f"sum({n.WORKER_PROCESS_BYTES}{cs} and {n.WORKER_LIMIT_BYTES}{cs}) "
            f"/ sum({n.WORKER_LIMIT_BYTES}{cs})",
        )
    )
    d = d.with_panel(
        _stat(
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
        _stat(
            "Scheduler",
            "Whether the exporter's last poll of the scheduler succeeded (worst exporter shown).",
            "none",
            f"min({n.SCHEDULER_UP}{cs})",
        ).mappings(_mappings(UP_MAPPING))
    )
    d = d.with_panel(
        _stat(
            "Oldest heartbeat",
            "Age of the stalest worker heartbeat: a worker whose event loop is blocked stops "
            "sending them, and its memory figures go stale.",
            "s",
            f"max({n.WORKER_HEARTBEAT_AGE_SECONDS}{cs})",
        )
    )
    d = d.with_panel(
        _stacked_breakdown(
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
        _threshold_ratio_lines(
            _ts(
                "Process memory of limit, per worker",
                "Each worker's process memory as a share of its memory limit; the dashed lines "
                "are the memory manager's thresholds (target: spilling stops; spill: spilling "
                "starts; pause: no new tasks; terminate: the nanny restarts the worker).",
                "percentunit",
            )
            .legend(_legend_table(("lastNotNull", "max")))
            .with_target(
                _q(
                    f"{n.WORKER_PROCESS_BYTES}{ws} / {n.WORKER_LIMIT_BYTES}{ws}",
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
        _stacked_breakdown(
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
    row = db.Row("Exporter")
    for panel in _exporter_panels(q):
        row = row.with_panel(panel)
    return d.with_row(row)


def _bars_by_worker(q: _Sel) -> barchart.Panel:
    ws = q.worker()
    refs = _refs()
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
        .tooltip(_tooltip())
    )
    rename: dict[str, str] = {}
    for legend, metric in BREAKDOWN:
        ref = next(refs)
        panel = panel.with_target(
            _q(f"max by ({q.by_worker}) ({metric}{ws})", ref, instant=True)
        ).override_by_name(legend, [_color(COLORS[legend])])
        rename[f"Value #{ref}"] = legend
    excluded = (n.LABEL_WORKER, *q.c.cluster_labels)
    return panel.transformations(_merge_table(rename, q.c.cluster_labels, excluded))


def _worker_table(q: _Sel, config: MixinConfig) -> table.Panel:
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
    refs = _refs()
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
        .thresholds(_fixed_thresholds())
        .sort_by([cb.TableSortByFieldState().display_name(PROCESS).desc(True)])
        .filterable(False)
    )
    rename: dict[str, str] = {}
    for legend, expr in columns:
        ref = next(refs)
        panel = panel.with_target(_q(expr, ref, instant=True))
        rename[f"Value #{ref}"] = legend
    for legend, _ in BREAKDOWN:
        panel = panel.override_by_name(legend, [_color(COLORS[legend])])
    worker_url = (
        f"/d/{dashboard_uid(WORKER_FILE)}/{_slug(WORKER_FILE)}"
        f"?var-{WORKER_VAR}=${{__value.raw}}&{_var_params(config)}&${{__url_time_range}}"
    )
    panel = (
        panel.override_by_name(
            n.LABEL_WORKER_NAME,
            [_prop("links", [{"title": "Worker memory", "url": worker_url}])],
        )
        .override_by_name(
            share,
            [
                _prop("unit", "percentunit"),
                _prop("max", 1),
                _prop("min", 0),
                _prop("custom.cellOptions", {"type": "gauge", "mode": "basic"}),
                _prop("color", {"mode": "continuous-GrYlRd"}),
            ],
        )
        .override_by_name(
            paused,
            [
                _prop("unit", "none"),
                _prop("mappings", _mappings(PAUSED_MAPPING)),
                _prop("custom.cellOptions", {"type": "color-text"}),
            ],
        )
        .override_by_name(heartbeat, [_prop("unit", "s"), _prop("decimals", 1)])
    )
    return panel.transformations(_merge_table(rename, q.c.cluster_labels))


def _alerts_table(q: _Sel) -> table.Panel:
    return (
        table.Panel()
        .title("Alert list")
        .description(
            f"Alerts named {ALERTNAME_REGEX} (docs/runbooks.md has a section for each) firing "
            "now for these clusters, from Prometheus' ALERTS series."
        )
        .datasource(DS)
        .with_target(
            _q(
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


def _exporter_panels(q: _Sel) -> list[timeseries.Panel | statetimeline.Panel]:
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
        .with_target(_q(f"{n.SCHEDULER_UP}{cs}", "A", "scheduler reachable " + instance))
        .with_target(
            _q(
                f"{n.EXPORTER_SOURCE_SUCCESS}{cs}",
                "B",
                "{{" + n.LABEL_SOURCE + "}} source " + instance,
            )
        )
        .mappings(_mappings(UP_MAPPING))
        .thresholds(_fixed_thresholds())
        .height(6)
        .span(12),
        _ts("Poll duration", "Wall time of the exporter's last poll of the scheduler.", "s")
        .with_target(_q(f"{n.EXPORTER_POLL_DURATION_SECONDS}{cs}", "A", instance))
        .height(6)
        .span(12),
        _ts(
            "Source errors",
            "Failed fetches per second of each source (the scheduler, the local processes), "
            "and worker entries skipped as malformed.",
            "short",
        )
        .with_target(
            _q(
                f"rate({n.EXPORTER_SOURCE_ERRORS_TOTAL}{cs}[$__rate_interval])",
                "A",
                "errors/s {{source}} " + instance,
            )
        )
        .with_target(_q(f"{n.EXPORTER_SKIPPED_WORKERS}{cs}", "B", "skipped workers " + instance))
        .height(6)
        .span(12),
        _ts(
            "Time since last successful poll",
            "How stale the worker figures are: seconds since the exporter last polled the "
            "scheduler successfully.",
            "s",
        )
        .with_target(_q(f"time() - {n.EXPORTER_LAST_SUCCESS_TIMESTAMP_SECONDS}{cs}", "A", instance))
        .height(6)
        .span(12),
    ]


def _builtin_annotation() -> db.AnnotationQuery:
    return (
        db.AnnotationQuery()
        .name("Annotations & Alerts")
        .datasource(dm.DataSourceRef(type_val="grafana", uid="-- Grafana --"))
        .built_in(1)
        .enable(True)
        .hide(True)
        .icon_color("rgba(0, 211, 255, 1)")
        .type("dashboard")
    )


# --- the worker dashboard ---------------------------------------------------------------------
def worker_dashboard(config: MixinConfig) -> db.Dashboard:
    """ "Dask worker memory": one worker over time."""
    q = _Sel(config)
    ws = q.worker()
    d = _with_head(
        _base(
            config,
            "Dask worker memory",
            WORKER_FILE,
            "One Dask worker's memory over time against its limit and thresholds, its process "
            "memory by source, paused state and heartbeat age. From dask-memory-exporter.",
        ).link(_link("Dask cluster memory", CLUSTER_FILE)),
        q,
        worker_multi=False,
        paused_name="Paused",
        alerts_enabled=True,
        alerts_expr=q.alerts(FIRING, q.worker_matcher),
    )
    d = d.with_row(db.Row("$worker"))
    d = d.with_panel(
        _stat(
            "Process memory",
            "The worker's RSS as its heartbeat reports it.",
            "bytes",
            f"max({n.WORKER_PROCESS_BYTES}{ws})",
        )
    )
    d = d.with_panel(
        _stat(
            "Share of limit",
            "Process memory as a share of the memory limit.",
            "percentunit",
            f"max({n.WORKER_PROCESS_BYTES}{ws} / {n.WORKER_LIMIT_BYTES}{ws})",
        )
    )
    d = d.with_panel(
        _stat(
            "Memory limit",
            "The worker's memory_limit.",
            "bytes",
            f"max({n.WORKER_LIMIT_BYTES}{ws})",
        )
    )
    d = d.with_panel(
        _stat(
            "Spilled",
            "Managed data spilled to disk.",
            "bytes",
            f"max({n.WORKER_SPILLED_BYTES}{ws})",
        )
    )
    d = d.with_panel(
        _stat(
            "Status",
            "Paused above the pause threshold: no new tasks.",
            "none",
            f"max({n.WORKER_PAUSED}{ws})",
        )
        .mappings(_mappings(PAUSED_MAPPING))
        .graph_mode(cm.BigValueGraphMode.NONE)
    )
    d = d.with_panel(
        _stat(
            "Last heartbeat",
            "Seconds since the scheduler last heard from the worker.",
            "s",
            f"max({n.WORKER_HEARTBEAT_AGE_SECONDS}{ws})",
        )
    )
    d = d.with_panel(
        _stacked_breakdown(
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
        _threshold_ratio_lines(
            _ts(
                "Process memory of limit",
                "Process memory as a share of the memory limit, with the thresholds.",
                "percentunit",
            ).with_target(
                _q(
                    f"{n.WORKER_PROCESS_BYTES}{ws} / {n.WORKER_LIMIT_BYTES}{ws}",
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
        _ts(
            "Process memory by source",
            "The worker's RSS as its heartbeat reports it through the scheduler, and as the "
            "exporter's sidecar reads it directly from the operating system (local mode only; "
            "absent otherwise). They differ by up to one heartbeat interval.",
            "bytes",
        )
        .with_target(_q(f"{n.WORKER_PROCESS_BYTES}{ws}", "A", "scheduler heartbeat {{worker}}"))
        .with_target(_q(f"{n.WORKER_RSS_BYTES}{ws}", "B", "direct RSS (sidecar) {{worker}}"))
        .height(8)
        .span(12)
    )
    d = d.with_panel(
        _ts(
            "Unmanaged (old) memory growth",
            f"Growth rate of unmanaged (old) memory over {config.pause_predicted_window} (the "
            "window DaskWorkerPausePredicted uses). Steadily positive: a leak, or memory the "
            "allocator keeps.",
            "Bps",
            floor=False,  # shrinking is negative
        )
        .with_target(
            _q(
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
        .with_target(_q(f"{n.WORKER_PAUSED}{ws}", "A", "{{" + n.LABEL_WORKER + "}}"))
        .mappings(_mappings(PAUSED_MAPPING))
        .thresholds(_fixed_thresholds())
        .height(8)
        .span(8)
    )
    stale = duration_seconds(config.heartbeat_stale_after)
    d = d.with_panel(
        _ts(
            "Heartbeat age",
            f"Seconds since the scheduler last heard from the worker; the line is "
            f"{config.heartbeat_stale_after}, where DaskWorkerHeartbeatStale starts counting.",
            "s",
        )
        .with_target(_q(f"{n.WORKER_HEARTBEAT_AGE_SECONDS}{ws}", "A", "{{" + n.LABEL_WORKER + "}}"))
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
    return d


# --- rendering --------------------------------------------------------------------------------
PANEL_PLUGINS = {
    "barchart": "Bar chart",
    "stat": "Stat",
    "state-timeline": "State timeline",
    "table": "Table",
    "timeseries": "Time series",
}


def _walk_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for p in panels:
        yield p
        yield from _walk_panels(p.get("panels", []))


def _finish(doc: dict[str, Any]) -> dict[str, Any]:
    """What the SDK does not emit: panel ids, import metadata, annotation details."""
    panels = list(_walk_panels(doc["panels"]))
    for i, p in enumerate(panels, start=1):
        p["id"] = i
    types = sorted({p["type"] for p in panels if p["type"] != "row"})
    doc["__inputs"] = [
        {
            "name": DATASOURCE_INPUT,
            "label": "Prometheus",
            "description": "Prometheus that scrapes dask-memory-exporter",
            "type": "datasource",
            "pluginId": "prometheus",
            "pluginName": "Prometheus",
        }
    ]
    doc["__requires"] = [
        {"type": "grafana", "id": "grafana", "name": "Grafana", "version": GRAFANA_VERSION},
        {"type": "datasource", "id": "prometheus", "name": "Prometheus", "version": "1.0.0"},
        *({"type": "panel", "id": t, "name": PANEL_PLUGINS[t], "version": ""} for t in types),
    ]
    doc["id"] = None
    doc.setdefault("templating", {}).setdefault("list", [])
    for a in doc["annotations"]["list"]:
        if "expr" in a:  # Prometheus annotation fields the SDK's model lacks
            title, tags = ANNOTATION_FORMATS[a["name"]]
            a.update(
                step=ANNOTATION_STEP,
                titleFormat=title,
                tagKeys=tags,
                textFormat="",
                useValueForTime=False,
            )
    return doc


def _dump(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=2, sort_keys=True) + "\n"


def _doc(builder: db.Dashboard) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(json.dumps(builder.build(), cls=JSONEncoder))
    return _finish(doc)


def render_files(config: MixinConfig) -> dict[str, str]:
    """File name -> dashboard JSON for grafana/dashboards/ (indent 2, sorted keys, newline)."""
    return {
        CLUSTER_FILE: _dump(_doc(cluster_dashboard(config))),
        WORKER_FILE: _dump(_doc(worker_dashboard(config))),
    }


def render_provisioning(config: MixinConfig) -> dict[str, str]:
    """File name -> text for grafana/provisioning/: the sidecar ConfigMap and a provider file."""
    return {"configmap.yaml": render_configmap(config), "dashboards.yaml": render_provider()}


def render_configmap(config: MixinConfig, namespace: str | None = None) -> str:
    """A ConfigMap carrying both dashboards, labelled for the Grafana Helm chart's sidecar."""
    metadata: dict[str, Any] = {
        "name": CONFIGMAP_NAME,
        "labels": {
            "grafana_dashboard": "1",
            "app.kubernetes.io/name": "dask-memory-exporter",
            "app.kubernetes.io/component": "dashboards",
        },
        "annotations": {"grafana_folder": "Dask"},
    }
    if namespace:
        metadata["namespace"] = namespace
    doc = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata,
        "data": render_files(config),
    }
    header = (
        "# Generated by `dask-memory-exporter generate dashboards` (exporter/dashboards.py):\n"
        "# do not edit. The Grafana Helm chart's sidecar (sidecar.dashboards.enabled) loads\n"
        '# ConfigMaps labelled grafana_dashboard: "1"; grafana_folder names the folder when\n'
        "# sidecar.dashboards.folderAnnotation is grafana_folder.\n"
    )
    return header + yaml.dump(doc, Dumper=_LiteralDumper, sort_keys=False, width=100)


class _LiteralDumper(yaml.SafeDumper):
    """Multi-line strings (the dashboards' JSON) as readable ``|`` blocks."""


def _str_representer(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_LiteralDumper.add_representer(str, _str_representer)


def render_provider() -> str:
    """A Grafana dashboard-provider file that loads grafana/dashboards/*.json from disk."""
    doc = {
        "apiVersion": 1,
        "providers": [
            {
                "name": "dask-memory-exporter",
                "orgId": 1,
                "folder": "Dask",
                "type": "file",
                "disableDeletion": False,
                "allowUiUpdates": False,
                "updateIntervalSeconds": 60,
                "options": {
                    "path": "/var/lib/grafana/dashboards/dask-memory-exporter",
                    "foldersFromFilesStructure": False,
                },
            }
        ],
    }
    header = (
        "# Grafana dashboard provider: copy to /etc/grafana/provisioning/dashboards/ and put\n"
        "# grafana/dashboards/*.json into options.path. Generated by exporter/dashboards.py.\n"
    )
    return header + yaml.safe_dump(doc, sort_keys=False)
