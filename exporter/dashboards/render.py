"""Dashboard JSON files: what the SDK does not emit, and deterministic text."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.cog.encoder import JSONEncoder

from .. import names as n
from ..mixin import MixinConfig
from .cluster import cluster_dashboard
from .panels import CLUSTER_FILE, DATASOURCE_INPUT, WORKER_FILE
from .worker import worker_dashboard

GRAFANA_VERSION = "11.6.0"
"""The Grafana build whose schema the SDK emits (schemaVersion 41); ``__requires`` names it."""

ANNOTATION_STEP = "15s"
"""Minimum step of annotation queries (Grafana widens it for long ranges); shorter pauses than
this can be missed."""
ANNOTATION_FORMATS = {  # annotation name -> (titleFormat, tagKeys)
    "Paused workers": ("{{worker_name}} paused", n.LABEL_WORKER_NAME),
    "Paused": ("{{worker_name}} paused", n.LABEL_WORKER_NAME),
    "Dask alerts": ("{{alertname}}", f"alertname,severity,{n.LABEL_WORKER_NAME}"),
    "Memory restarts": ("{{worker_name}} killed for memory", n.LABEL_WORKER_NAME),
    "Memory restart": ("{{worker_name}} killed for memory", n.LABEL_WORKER_NAME),
    "Workers lost": ("workers lost: {{cause}}", n.LABEL_CAUSE),
}

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
