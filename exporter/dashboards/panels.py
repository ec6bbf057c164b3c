"""Panel, variable and annotation builders shared by both dashboards."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from typing import Any

from grafana_foundation_sdk.builders import common as cb
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import prometheus as pb
from grafana_foundation_sdk.builders import stat, timeseries
from grafana_foundation_sdk.models import common as cm
from grafana_foundation_sdk.models import dashboard as dm
from grafana_foundation_sdk.models import prometheus as pm

from .. import names as n
from ..mixin import MixinConfig
from .queries import DS_VAR, WORKER_VAR, Queries

CLUSTER_FILE = "dask-cluster-memory.json"
WORKER_FILE = "dask-worker-memory.json"
DATASOURCE_INPUT = "DS_PROMETHEUS"

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
PAUSED_MAPPING = {"0": ("running", "green"), "1": ("paused", "orange")}
UP_MAPPING = {"0": ("unreachable", "red"), "1": ("reachable", "green")}


def dashboard_uid(file_name: str) -> str:
    """Stable uid of a dashboard: the md5 of its file name (as kubernetes-mixin does)."""
    return hashlib.md5(file_name.encode(), usedforsecurity=False).hexdigest()


def slug(file_name: str) -> str:
    """The readable part of a dashboard URL, after the uid."""
    return file_name.removesuffix(".json")


# --- small builders -------------------------------------------------------------------------
def target(expr: str, ref: str, legend: str = "", instant: bool = False) -> pb.Dataquery:
    q = pb.Dataquery().expr(expr).ref_id(ref).datasource(DS)
    if instant:
        q = q.instant().format(pm.PromQueryFormat.TABLE)
    else:
        q = q.range()
        if legend:
            q = q.legend_format(legend)
    return q


def ref_ids() -> Iterator[str]:
    return iter("ABCDEFGHIJKLMNOPQRSTUVWXYZ")


def fixed_color(color: str) -> dm.DynamicConfigValue:
    return dm.DynamicConfigValue(id_val="color", value={"mode": "fixed", "fixedColor": color})


def prop(id_val: str, value: Any) -> dm.DynamicConfigValue:
    return dm.DynamicConfigValue(id_val=id_val, value=value)


def line_style(color: str, dash: bool = True) -> list[dm.DynamicConfigValue]:
    """An unstacked, unfilled (dashed) line: limits and thresholds over a stacked area."""
    props = [
        fixed_color(color),
        prop("custom.stacking", {"mode": "none", "group": "A"}),
        prop("custom.fillOpacity", 0),
        prop("custom.lineWidth", 2),
    ]
    if dash:
        props.append(prop("custom.lineStyle", {"fill": "dash", "dash": [10, 10]}))
    return props


def value_mappings(table_: dict[str, tuple[str, str]]) -> list[dm.ValueMapping]:
    return [
        dm.ValueMap(
            options={
                value: dm.ValueMappingResult(text=text, color=color, index=i)
                for i, (value, (text, color)) in enumerate(table_.items())
            }
        )
    ]


def fixed_thresholds(color: str = "text") -> db.ThresholdsConfig:
    return (
        db.ThresholdsConfig()
        .mode(dm.ThresholdsMode.ABSOLUTE)
        .steps([dm.Threshold(value=None, color=color)])
    )


def legend_table(calcs: Sequence[str] = ("lastNotNull", "max")) -> cb.VizLegendOptions:
    return (
        cb.VizLegendOptions()
        .display_mode(cm.LegendDisplayMode.TABLE)
        .placement(cm.LegendPlacement.BOTTOM)
        .show_legend(True)
        .calcs(list(calcs))
    )


def tooltip() -> cb.VizTooltipOptions:
    return cb.VizTooltipOptions().mode(cm.TooltipDisplayMode.MULTI).sort(cm.SortOrder.DESCENDING)


def ts_panel(title: str, description: str, unit: str, floor: bool = True) -> timeseries.Panel:
    panel = timeseries.Panel().title(title).description(description).datasource(DS).unit(unit)
    if floor:
        panel = panel.min(0)
    return (
        panel.line_width(1)
        .fill_opacity(0)
        .show_points(cm.VisibilityMode.NEVER)
        .legend(legend_table())
        .tooltip(tooltip())
    )


def stat_panel(title: str, description: str, unit: str, expr: str) -> stat.Panel:
    return (
        stat.Panel()
        .title(title)
        .description(description)
        .datasource(DS)
        .unit(unit)
        .with_target(target(expr, "A", legend=title))
        .reduce_options(cb.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
        .color_mode(cm.BigValueColorMode.VALUE)
        .graph_mode(cm.BigValueGraphMode.AREA)
        .thresholds(fixed_thresholds())
        .height(4)
        .span(4)
    )


def stacked_breakdown(
    q: Queries, title: str, description: str, sel: str, totals: bool, thresholds: bool
) -> timeseries.Panel:
    """Managed / unmanaged / recent / spilled stacked, with the limit (and the thresholds of the
    workers the ``worker`` variable selects) as lines."""
    refs = ref_ids()
    panel = (
        ts_panel(title, description, "bytes")
        .fill_opacity(70)
        .stacking(cb.StackingConfig().mode(cm.StackingMode.NORMAL).group("A"))
    )
    for legend, metric in BREAKDOWN:
        expr = q.cluster_total(metric) if totals else f"sum({metric}{sel})"
        panel = panel.with_target(target(expr, next(refs), legend))
        panel = panel.override_by_name(legend, [fixed_color(COLORS[legend])])
    limit = q.cluster_total(n.WORKER_LIMIT_BYTES) if totals else f"sum({n.WORKER_LIMIT_BYTES}{sel})"
    panel = panel.with_target(target(limit, next(refs), LIMIT))
    panel = panel.override_by_name(LIMIT, line_style(COLORS[LIMIT], dash=False))
    if thresholds:
        expr = f"max by ({n.LABEL_THRESHOLD}) ({q.threshold_bytes()})"
        panel = panel.with_target(target(expr, next(refs), "{{" + n.LABEL_THRESHOLD + "}}"))
        for t in n.THRESHOLDS:
            panel = panel.override_by_name(t, line_style(COLORS[t]))
    return panel


def threshold_ratio_lines(
    panel: timeseries.Panel, q: Queries, sel: str, ref: str
) -> timeseries.Panel:
    expr = f"max by ({n.LABEL_THRESHOLD}) ({q.threshold_ratio(sel)})"
    panel = panel.with_target(target(expr, ref, "{{" + n.LABEL_THRESHOLD + "}}"))
    for t in n.THRESHOLDS:
        panel = panel.override_by_name(t, line_style(COLORS[t]))
    return panel


def merge_table(
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
def variables(q: Queries, worker_multi: bool) -> list[db.QueryVariable | db.DatasourceVariable]:
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


def var_params(config: MixinConfig) -> str:
    """URL parameters carrying the data source and cluster variables to the other dashboard."""
    return "&".join(f"${{{v}:queryparam}}" for v in (DS_VAR, *config.cluster_labels))


def dashboard_link(title: str, file_name: str) -> db.DashboardLink:
    return (
        db.DashboardLink(title)
        .type(dm.DashboardLinkType.LINK)
        .url(f"/d/{dashboard_uid(file_name)}/{slug(file_name)}")
        .icon("dashboard")
        .include_vars(True)
        .keep_time(True)
        .target_blank(False)
        .as_dropdown(False)
        .tooltip("")
        .tags([])
    )


def base_dashboard(
    config: MixinConfig, title: str, file_name: str, description: str
) -> db.Dashboard:
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


def with_head(
    d: db.Dashboard,
    q: Queries,
    *,
    worker_multi: bool,
    paused_name: str,
    alerts_enabled: bool,
    alerts_expr: str,
) -> db.Dashboard:
    """What both dashboards start with: variables, and annotations for pauses and alerts."""
    for v in variables(q, worker_multi=worker_multi):
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
