"""Generated dashboards: what Grafana's importer needs, the contract with names.py and rules.py,
and no drift between the committed files and the generator."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from dask_memory_exporter import names as n
from dask_memory_exporter.cli import main
from dask_memory_exporter.dashboards import (
    ALERTNAME_REGEX,
    CLUSTER_FILE,
    DATASOURCE_INPUT,
    WORKER_FILE,
    dashboard_uid,
    render_configmap,
    render_files,
    render_provider,
    render_provisioning,
)
from dask_memory_exporter.mixin import MixinConfig
from dask_memory_exporter.rules import alert_rules, recording_rules

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = ROOT / "grafana" / "dashboards"
PROVISIONING = ROOT / "grafana" / "provisioning"
CONFIG = MixinConfig()
GRAFANA_BUILTINS = {"__rate_interval", "__interval", "__range", "__all"}
TITLES = {CLUSTER_FILE: "Dask cluster memory", WORKER_FILE: "Dask worker memory"}


def docs(config: MixinConfig = CONFIG) -> dict[str, dict[str, Any]]:
    return {name: json.loads(text) for name, text in render_files(config).items()}


def walk(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for p in panels:
        yield p
        yield from walk(p.get("panels", []))


def panels(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in walk(doc["panels"]) if p["type"] != "row"]


def exprs(doc: dict[str, Any]) -> list[str]:
    out = [t["expr"] for p in panels(doc) for t in p.get("targets", [])]
    out += [a["expr"] for a in doc["annotations"]["list"] if "expr" in a]
    out += [v["query"] for v in doc["templating"]["list"] if v["type"] == "query"]
    return out


ALL = docs()


# --- drift ------------------------------------------------------------------------------------
def test_committed_dashboards_equal_the_generator() -> None:
    files = render_files(CONFIG)
    assert sorted(files) == [CLUSTER_FILE, WORKER_FILE]
    committed = {p.name: p.read_text() for p in DASHBOARDS.glob("*.json")}
    assert committed == files, (
        "grafana/dashboards/ is stale: run `dask-memory-exporter generate dashboards`"
    )


def test_committed_provisioning_equals_the_generator() -> None:
    files = render_provisioning(CONFIG)
    assert files == {
        "configmap.yaml": render_configmap(CONFIG),
        "dashboards.yaml": render_provider(),
    }
    committed = {p.name: p.read_text() for p in PROVISIONING.glob("*.yaml")}
    assert committed == files, "grafana/provisioning/ is stale: regenerate with render_provisioning"


def test_rendering_is_deterministic_and_json_is_stable() -> None:
    assert render_files(CONFIG) == render_files(MixinConfig())
    for text in render_files(CONFIG).values():
        assert text.endswith("}\n")
        assert text == json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n"


def test_cli_generate_writes_the_same_files(tmp_path: Path) -> None:
    assert main(["generate", "dashboards", "--output-dir", str(tmp_path)]) == 0
    written = {p.name: p.read_text() for p in tmp_path.iterdir()}
    assert written == render_files(CONFIG)
    assert main(["generate", "dashboards", "--output-dir", str(tmp_path), "--set",
                 'exporter_selector=job="dask"']) == 0  # fmt: skip
    text = (tmp_path / CLUSTER_FILE).read_text()
    assert 'job=\\"dask\\"' in text and 'dask-memory-exporter\\"' not in text


# --- what Grafana's importer needs ----------------------------------------------------------
@pytest.mark.parametrize("file", [CLUSTER_FILE, WORKER_FILE])
def test_importable_structure(file: str) -> None:
    doc = ALL[file]
    assert doc["title"] == TITLES[file]
    assert (
        doc["uid"]
        == hashlib.md5(file.encode(), usedforsecurity=False).hexdigest()
        == dashboard_uid(file)
    )
    assert len(doc["uid"]) <= 40
    assert doc["schemaVersion"] == 41
    assert doc["id"] is None  # import creates a new dashboard
    assert isinstance(doc["templating"]["list"], list) and doc["templating"]["list"]
    assert isinstance(doc["annotations"]["list"], list)
    assert doc["refresh"] == CONFIG.dashboard_refresh
    assert doc["tags"] == list(CONFIG.dashboard_tags)
    assert doc["time"] == {"from": CONFIG.dashboard_time_from, "to": "now"}

    assert doc["__inputs"] == [
        {
            "name": DATASOURCE_INPUT,
            "label": "Prometheus",
            "description": "Prometheus that scrapes dask-memory-exporter",
            "type": "datasource",
            "pluginId": "prometheus",
            "pluginName": "Prometheus",
        }
    ]
    requires = {(r["type"], r["id"]) for r in doc["__requires"]}
    used = {("panel", p["type"]) for p in panels(doc)}
    assert requires == {("grafana", "grafana"), ("datasource", "prometheus"), *used}

    titles = [p["title"] for p in panels(doc)]
    assert len(titles) == len(set(titles)), "panel titles identify panels in tests and links"

    ids = [p["id"] for p in walk(doc["panels"])]
    assert len(ids) == len(set(ids)) and all(isinstance(i, int) and i > 0 for i in ids)


@pytest.mark.parametrize("file", [CLUSTER_FILE, WORKER_FILE])
def test_panels_have_datasource_targets_and_a_place_on_the_grid(file: str) -> None:
    doc = ALL[file]
    for p in panels(doc):
        assert p["title"], p
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        targets = p["targets"]
        assert targets, p["title"]
        refs = [t["refId"] for t in targets]
        assert all(refs) and len(refs) == len(set(refs)), p["title"]
        for t in targets:
            assert t["expr"].strip(), p["title"]
            assert t["datasource"] == p["datasource"]
        g = p["gridPos"]
        assert g["w"] > 0 and g["h"] > 0 and g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
    for row in (p for p in doc["panels"] if p["type"] == "row"):
        if row["panels"]:
            assert row["collapsed"] is True  # Grafana drops panels inside an open row


@pytest.mark.parametrize("file", [CLUSTER_FILE, WORKER_FILE])
def test_variables(file: str) -> None:
    doc = ALL[file]
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    assert list(variables) == ["datasource", *CONFIG.cluster_labels, "worker"]
    ds = variables["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    assert ds["current"]["value"] == "${" + DATASOURCE_INPUT + "}"
    assert ds["allowCustomValue"] is False  # an unresolved input falls back to a real source
    for label in CONFIG.cluster_labels:
        v = variables[label]
        assert v["type"] == "query" and v["includeAll"] and v["allValue"] == ".*"
        assert v["query"].startswith(f"label_values({n.SCHEDULER_UP}{{")
        assert v["query"].endswith(f", {label})")
        assert v["datasource"]["uid"] == "${datasource}"
    worker = variables["worker"]
    assert worker["query"].endswith(f", {n.LABEL_WORKER_NAME})")
    assert worker["multi"] is (file == CLUSTER_FILE)

    # every $variable in a query is defined (or one of Grafana's own)
    defined = set(variables) | GRAFANA_BUILTINS
    for expr in exprs(doc):
        for name in re.findall(r"\$\{?(\w+)", expr):
            assert name in defined, (name, expr)


# --- the contract with names.py and rules.py -------------------------------------------------
METRIC = re.compile(r"\b(dask_[a-z_:]+)")


def known_series(config: MixinConfig) -> set[str]:
    names = {v for k, v in vars(n).items() if k.isupper() and isinstance(v, str)}
    return names | {r["record"] for r in recording_rules(config)}


@pytest.mark.parametrize("recording", [True, False])
def test_only_contract_metrics_and_recorded_series(recording: bool) -> None:
    config = dataclasses.replace(CONFIG, dashboard_recording_rules=recording)
    known = known_series(config)
    used: set[str] = set()
    for doc in docs(config).values():
        for expr in exprs(doc):
            used |= set(METRIC.findall(expr))
    assert used <= known, used - known
    recorded = {u for u in used if ":" in u}
    assert bool(recorded) is recording
    for family in (*n.WORKER_FAMILIES, n.WORKER_RSS_BYTES, n.SCHEDULER_UP):
        assert family in used, family


SELECTOR = re.compile(r"([A-Za-z_:][\w:]*)\{([^}]*)\}")


@pytest.mark.parametrize("recording", [True, False])
def test_every_query_uses_the_configured_selector(recording: bool) -> None:
    config = dataclasses.replace(
        CONFIG,
        exporter_selector='service="dask-exp"',
        cluster_labels=("cluster", "namespace"),
        dashboard_recording_rules=recording,
    )
    for doc in docs(config).values():
        for expr in exprs(doc):
            assert "dask-memory-exporter" not in expr
            selectors = SELECTOR.findall(expr)
            assert selectors, expr
            for name, matchers in selectors:
                if ":" in name:  # recorded per cluster: the rule applied the exporter selector
                    assert matchers == 'cluster=~"$cluster", namespace=~"$namespace"', expr
                    continue
                assert matchers.startswith('service="dask-exp"'), expr
                if not expr.startswith("label_values"):
                    assert 'cluster=~"$cluster", namespace=~"$namespace"' in matchers, expr
        names = [v["name"] for v in doc["templating"]["list"]]
        assert names == ["datasource", "cluster", "namespace", "worker"]


def test_cluster_labels_may_not_shadow_the_dashboards_own_variables() -> None:
    with pytest.raises(ValueError, match="worker"):
        render_files(dataclasses.replace(CONFIG, cluster_labels=("job", "worker")))


def test_alerts_panel_selects_every_project_alert() -> None:
    for rule in alert_rules(CONFIG):
        assert re.fullmatch(ALERTNAME_REGEX, rule["alert"]), rule["alert"]
    cluster = ALL[CLUSTER_FILE]
    titles = {p["title"]: p for p in panels(cluster)}
    assert 'alertname=~"Dask.*"' in titles["Alert list"]["targets"][0]["expr"]


# --- content ------------------------------------------------------------------------------------
def by_title(file: str) -> dict[str, dict[str, Any]]:
    return {p["title"]: p for p in panels(ALL[file])}


def overrides(panel: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        o["matcher"]["options"]: {prop["id"]: prop["value"] for prop in o["properties"]}
        for o in panel["fieldConfig"]["overrides"]
    }


def test_stacked_breakdown_in_the_dask_colours_with_limit_and_thresholds() -> None:
    for file, title in ((CLUSTER_FILE, "Cluster memory"), (CLUSTER_FILE, "$worker"),
                        (WORKER_FILE, "Memory")):  # fmt: skip
        p = by_title(file)[title]
        assert p["fieldConfig"]["defaults"]["unit"] == "bytes"
        assert p["fieldConfig"]["defaults"]["custom"]["stacking"]["mode"] == "normal"
        legends = [t.get("legendFormat") for t in p["targets"]]
        assert legends[:5] == ["managed", "unmanaged (old)", "unmanaged recent", "spilled", "limit"]
        ov = overrides(p)
        colours = [ov[name]["color"]["fixedColor"] for name in legends[:4]]
        assert colours == ["blue", "light-blue", "super-light-blue", "#8c8c8c"]
        assert ov["limit"]["custom.stacking"]["mode"] == "none"
        if title != "Cluster memory":
            assert legends[5] == "{{threshold}}"
            for t in n.THRESHOLDS:
                assert ov[t]["custom.stacking"]["mode"] == "none"
                assert ov[t]["custom.lineStyle"]["fill"] == "dash"
    assert by_title(CLUSTER_FILE)["$worker"]["repeat"] == "worker"


def test_process_of_limit_panels_are_percent_with_threshold_lines() -> None:
    for file, title in ((CLUSTER_FILE, "Process memory of limit, per worker"),
                        (WORKER_FILE, "Process memory of limit")):  # fmt: skip
        p = by_title(file)[title]
        assert p["fieldConfig"]["defaults"]["unit"] == "percentunit"
        assert n.WORKER_THRESHOLD_RATIO in p["targets"][1]["expr"]
        assert set(n.THRESHOLDS) <= set(overrides(p))


def test_worker_table_columns_sortable_and_linked() -> None:
    p = by_title(CLUSTER_FILE)["Worker table"]
    assert p["type"] == "table"
    organize = next(t for t in p["transformations"] if t["id"] == "organize")["options"]
    rename = organize["renameByName"]
    assert sorted(rename) == sorted(f"Value #{t['refId']}" for t in p["targets"])
    assert list(rename.values()) == [
        "process", "managed", "unmanaged (old)", "unmanaged recent", "spilled", "limit",
        "share of limit", "paused", "heartbeat age",
    ]  # fmt: skip
    assert all(t["instant"] and t["format"] == "table" for t in p["targets"])
    assert p["options"]["sortBy"] == [{"displayName": "process", "desc": True}]
    ov = overrides(p)
    assert ov["share of limit"]["unit"] == "percentunit"
    assert ov["heartbeat age"]["unit"] == "s"
    assert p["fieldConfig"]["defaults"]["unit"] == "bytes"
    link = ov[n.LABEL_WORKER_NAME]["links"][0]["url"]
    assert link.startswith(f"/d/{dashboard_uid(WORKER_FILE)}/")
    assert "var-worker=${__value.raw}" in link


def test_bar_chart_renames_every_query() -> None:
    p = by_title(CLUSTER_FILE)["Memory by worker, now"]
    organize = next(t for t in p["transformations"] if t["id"] == "organize")["options"]
    assert sorted(organize["renameByName"]) == sorted(f"Value #{t['refId']}" for t in p["targets"])
    assert p["options"]["xField"] == n.LABEL_WORKER_NAME
    assert p["options"]["stacking"] == "normal"


def test_pause_annotations() -> None:
    for file in (CLUSTER_FILE, WORKER_FILE):
        annotations = ALL[file]["annotations"]["list"]
        assert annotations[0]["builtIn"] == 1
        paused = next(a for a in annotations if "paused" in a.get("titleFormat", ""))
        assert paused["enable"] is True
        assert n.WORKER_PAUSED in paused["expr"] and paused["expr"].endswith("== 1")


def test_worker_dashboard_shows_rss_source_and_heartbeat() -> None:
    t = by_title(WORKER_FILE)
    exprs_ = [x["expr"] for x in t["Process memory by source"]["targets"]]
    assert n.WORKER_PROCESS_BYTES in exprs_[0] and n.WORKER_RSS_BYTES in exprs_[1]
    assert n.WORKER_HEARTBEAT_AGE_SECONDS in t["Heartbeat age"]["targets"][0]["expr"]
    steps = t["Heartbeat age"]["fieldConfig"]["defaults"]["thresholds"]["steps"]
    assert steps[-1]["value"] == 60  # heartbeat_stale_after = 1m


def test_dashboards_link_each_other() -> None:
    for file, other in ((CLUSTER_FILE, WORKER_FILE), (WORKER_FILE, CLUSTER_FILE)):
        (link,) = ALL[file]["links"]
        assert link["url"].startswith(f"/d/{dashboard_uid(other)}/")
        assert link["includeVars"] and link["keepTime"]


# --- provisioning ---------------------------------------------------------------------------------
def test_configmap_for_the_helm_sidecar() -> None:
    text = render_configmap(CONFIG)
    doc = yaml.safe_load(text)
    assert doc["apiVersion"] == "v1" and doc["kind"] == "ConfigMap"
    assert doc["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert doc["data"] == render_files(CONFIG)
    assert len(text.encode()) < 256 * 1024  # fits kubectl's last-applied annotation
    assert (
        yaml.safe_load(render_configmap(CONFIG, namespace="monitoring"))["metadata"]["namespace"]
        == "monitoring"
    )


def test_configmap_is_a_valid_kubernetes_object() -> None:
    kubernetes_validate.validate(yaml.safe_load(render_configmap(CONFIG)), "1.30", strict=True)


def test_provider_file() -> None:
    doc = yaml.safe_load(render_provider())
    assert doc["apiVersion"] == 1
    (provider,) = doc["providers"]
    assert provider["type"] == "file" and provider["options"]["path"]
