"""Generated dashboards: what Grafana's importer needs, the contract with names.py and rules.py,
what the panels show, and no drift between the committed files and the generator."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
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
    render_configmap,
    render_files,
    render_provider,
    render_provisioning,
)
from dask_memory_exporter.gpu_nvml import WORKER_GPU_PROCESS_MEMORY_BYTES
from dask_memory_exporter.heartbeat import GPU_GAUGES, WORKER_GPU_MEMORY_TOTAL_BYTES
from dask_memory_exporter.mixin import MixinConfig
from dask_memory_exporter.rules import alert_rules, recording_rules

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = ROOT / "grafana" / "dashboards"
PROVISIONING = ROOT / "grafana" / "provisioning"
CONFIG = MixinConfig()
GRAFANA_BUILTINS = {"__rate_interval", "__interval", "__range", "__all"}
TITLES = {CLUSTER_FILE: "Dask cluster memory", WORKER_FILE: "Dask worker memory"}
# Links and bookmarks point at these: a change of the uid derivation breaks them.
UIDS = {
    CLUSTER_FILE: "699af873066efe3e7a4e527330a20315",
    WORKER_FILE: "13393c23ef5477d53bcde6e16a57447a",
}


def docs(config: MixinConfig = CONFIG) -> dict[str, dict[str, Any]]:
    return {name: json.loads(text) for name, text in render_files(config).items()}


def walk(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for p in panels:
        yield p
        yield from walk(p.get("panels", []))


def panels(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in walk(doc["panels"]) if p["type"] != "row"]


def exprs(doc: dict[str, Any]) -> list[str]:
    """Every PromQL expression: panel targets, annotations, variable queries."""
    out = [t["expr"] for p in panels(doc) for t in p.get("targets", [])]
    out += [a["expr"] for a in doc["annotations"]["list"] if "expr" in a]
    out += [v["query"] for v in doc["templating"]["list"] if v["type"] == "query"]
    return out


def all_exprs(config: MixinConfig) -> list[str]:
    return [e for doc in docs(config).values() for e in exprs(doc)]


ALL = docs()


def by_title(file: str) -> dict[str, dict[str, Any]]:
    return {p["title"]: p for p in panels(ALL[file])}


def overrides(panel: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        o["matcher"]["options"]: {prop["id"]: prop["value"] for prop in o["properties"]}
        for o in panel["fieldConfig"]["overrides"]
    }


# --- drift and determinism ---------------------------------------------------------------------
def test_committed_dashboards_equal_the_generator() -> None:
    committed = {p.name: p.read_text() for p in DASHBOARDS.glob("*.json")}
    assert committed == render_files(CONFIG), "grafana/dashboards/ is stale: run `./dev generate`"


def test_committed_provisioning_equals_the_generator() -> None:
    committed = {p.name: p.read_text() for p in PROVISIONING.glob("*.yaml")}
    assert committed == render_provisioning(CONFIG), (
        "grafana/provisioning/ is stale: run `./dev generate`"
    )


def test_output_does_not_depend_on_the_hash_seed() -> None:
    """Set and dict iteration must not leak into the files: another interpreter with another
    hash seed writes the same bytes (otherwise the drift check would flap)."""
    script = (
        "import json, sys\n"
        "from dask_memory_exporter.dashboards import render_files, render_provisioning\n"
        "from dask_memory_exporter.mixin import MixinConfig\n"
        "c = MixinConfig()\n"
        "json.dump({**render_files(c), **render_provisioning(c)}, sys.stdout)\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "0"}  # this process runs with a random seed
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
    ).stdout
    assert json.loads(out) == {**render_files(CONFIG), **render_provisioning(CONFIG)}


def test_cli_generate_writes_the_files_of_the_given_settings(tmp_path: Path) -> None:
    assert main(["generate", "dashboards", "--output-dir", str(tmp_path)]) == 0
    written = {p.name: p.read_text() for p in tmp_path.iterdir()}
    assert written == render_files(CONFIG)
    assert main(["generate", "dashboards", "--output-dir", str(tmp_path), "--set",
                 'exporter_selector=job="dask"']) == 0  # fmt: skip
    text = (tmp_path / CLUSTER_FILE).read_text()
    assert 'job=\\"dask\\"' in text and 'dask-memory-exporter\\"' not in text


# --- what Grafana's importer needs ----------------------------------------------------------
def test_uids_are_stable_and_do_not_depend_on_the_settings() -> None:
    other = docs(
        dataclasses.replace(CONFIG, exporter_selector='job="x"', cluster_labels=("cluster",))
    )
    for file, uid in UIDS.items():
        assert ALL[file]["uid"] == other[file]["uid"] == uid
        assert len(uid) <= 40  # Grafana's limit


def test_dashboard_settings_follow_the_mixin_config() -> None:
    config = dataclasses.replace(
        CONFIG, dashboard_refresh="1m", dashboard_tags=("a", "b"), dashboard_time_from="now-6h"
    )
    for file, doc in docs(config).items():
        assert doc["title"] == TITLES[file]
        assert doc["refresh"] == "1m"
        assert doc["tags"] == ["a", "b"]
        assert doc["time"] == {"from": "now-6h", "to": "now"}


@pytest.mark.parametrize("file", [CLUSTER_FILE, WORKER_FILE])
def test_importable_structure(file: str) -> None:
    doc = ALL[file]
    assert doc["schemaVersion"] == 41
    assert doc["id"] is None  # import creates a new dashboard

    # The one input is what the data source variable defaults to, and nothing else is asked.
    (declared,) = doc["__inputs"]
    assert declared["name"] == DATASOURCE_INPUT and declared["pluginId"] == "prometheus"
    text = json.dumps({k: v for k, v in doc.items() if k != "__inputs"})
    assert set(re.findall(r"\$\{(DS_\w+)\}", text)) == {DATASOURCE_INPUT}

    # Grafana checks the plugins in __requires before import: exactly the panel types used.
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
    assert list(variables) == ["datasource", *CONFIG.cluster_labels, "worker", "gpu"]
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


def test_cluster_labels_may_not_shadow_the_dashboards_own_variables() -> None:
    with pytest.raises(ValueError, match="worker"):
        render_files(dataclasses.replace(CONFIG, cluster_labels=("job", "worker")))
    with pytest.raises(ValueError, match="gpu"):
        render_files(dataclasses.replace(CONFIG, cluster_labels=("gpu",)))


@pytest.mark.parametrize("file", [CLUSTER_FILE, WORKER_FILE])
def test_gpu_row_only_where_gpu_series_exist(file: str) -> None:
    """A collapsed GPU row repeated over the hidden variable ``gpu``, which lists the device
    memory family among the selected series (empty without GPU workers); its panels read only
    GPU families, and the heartbeat row shows none of them."""
    doc = ALL[file]
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    gpu = variables["gpu"]
    assert gpu["hide"] == 2  # hidden
    assert gpu["query"].startswith(f"label_values({WORKER_GPU_MEMORY_TOTAL_BYTES}{{")
    assert gpu["query"].endswith(", __name__)")
    rows = {p["title"]: p for p in doc["panels"] if p["type"] == "row"}
    row = rows["GPU (workers that report a device)"]
    assert row["collapsed"] is True and row["repeat"] == "gpu"
    gpu_names = {g.metric.name for g in GPU_GAUGES} | {WORKER_GPU_PROCESS_MEMORY_BYTES}
    read = {m for p in row["panels"] for t in p["targets"] for m in SERIES.findall(t["expr"])}
    assert read and read <= gpu_names
    others = [p for p in doc["panels"] if p["type"] != "row"]
    for p in others:
        for t in p.get("targets", []):
            assert not set(SERIES.findall(t["expr"])) & gpu_names, p["title"]


# --- the contract with names.py and rules.py -------------------------------------------------
SERIES = re.compile(r"\b([a-z_][a-z0-9_]*(?::[a-z0-9_]+)*)\s*\{")
RECORDED = re.compile(r"\b([a-z_]+:[a-z_]+(?::[a-z0-9_]+)?)")


def declared_metrics() -> set[str]:
    import dask_memory_exporter.app  # noqa: F401  (every source module, and its metrics)

    return set(n.declared())


def recorded_reads(exprs_: list[str]) -> set[str]:
    return {name for expr in exprs_ for name in RECORDED.findall(expr)}


@pytest.mark.parametrize("recording", [True, False])
def test_queries_read_only_declared_metrics_and_recorded_series(recording: bool) -> None:
    config = dataclasses.replace(CONFIG, dashboard_recording_rules=recording)
    known = declared_metrics() | {r["record"] for r in recording_rules(config)} | {"ALERTS"}
    read = {name for expr in all_exprs(config) for name in SERIES.findall(expr)}
    assert read <= known, read - known
    for family in (*n.WORKER_FAMILIES, n.WORKER_HEARTBEAT_PROCESS_BYTES, n.SCHEDULER_UP):
        assert family in read, family


@pytest.mark.parametrize(
    "config",
    [
        CONFIG,
        dataclasses.replace(CONFIG, cluster_labels=("cluster",), unmanaged_growing_window="2h"),
    ],
)
def test_every_recording_rule_is_read_and_every_recorded_read_is_defined(
    config: MixinConfig,
) -> None:
    defined = [r["record"] for r in recording_rules(config)]
    assert len(defined) == len(set(defined))
    by_dashboards = recorded_reads(all_exprs(config))
    by_alerts = recorded_reads([r["expr"] for r in alert_rules(config)])
    assert by_dashboards <= set(defined), by_dashboards - set(defined)
    assert by_alerts <= set(defined), by_alerts - set(defined)
    unread = set(defined) - by_dashboards - by_alerts
    assert not unread, f"recording rules nothing reads: {sorted(unread)}"


def test_without_recording_rules_the_dashboards_read_none() -> None:
    config = dataclasses.replace(CONFIG, dashboard_recording_rules=False)
    assert recorded_reads(all_exprs(config)) == set()


def test_recorded_names_are_never_retyped_in_the_dashboards_source() -> None:
    """They come from rules.py (cluster_sum, the constants), so a rename cannot miss one."""
    for path in (ROOT / "exporter" / "dashboards").glob("*.py"):
        assert not re.search(r"dask_(cluster|worker):", path.read_text()), path.name


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
                if ":" in name:  # recorded: the rule applied the exporter selector
                    assert matchers.startswith('cluster=~"$cluster", namespace=~"$namespace"')
                    continue
                assert matchers.startswith('service="dask-exp"'), expr
                if not expr.startswith("label_values"):
                    assert 'cluster=~"$cluster", namespace=~"$namespace"' in matchers, expr
        names = [v["name"] for v in doc["templating"]["list"]]
        assert names == ["datasource", "cluster", "namespace", "worker", "gpu"]


@pytest.mark.parametrize("recording", [True, False])
def test_every_query_of_the_worker_dashboard_filters_by_the_worker(recording: bool) -> None:
    doc = docs(dataclasses.replace(CONFIG, dashboard_recording_rules=recording))[WORKER_FILE]
    worker = f'{n.LABEL_WORKER_NAME}=~"$worker"'
    queries = [t["expr"] for p in panels(doc) for t in p["targets"]]
    queries += [a["expr"] for a in doc["annotations"]["list"] if "expr" in a]
    for expr in queries:
        for name, matchers in SELECTOR.findall(expr):
            assert worker in matchers, (name, expr)


def test_thresholds_come_from_the_exporter_not_from_constants() -> None:
    for expr in all_exprs(CONFIG):
        for number in re.findall(r"(?<![\w.$])(\d*\.\d+|\d+)(?![\w.])", expr):
            assert number in {"0", "1"}, (number, expr)  # == 1 (paused), vector(0)


def test_alerts_panel_selects_every_project_alert() -> None:
    expr = by_title(CLUSTER_FILE)["Alert list"]["targets"][0]["expr"]
    (regex,) = re.findall(r'alertname=~"([^"]+)"', expr)
    assert regex == ALERTNAME_REGEX
    for rule in alert_rules(CONFIG):
        assert re.fullmatch(regex, rule["alert"]), rule["alert"]


# --- what the panels show -----------------------------------------------------------------------
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


def test_worker_table_columns_sortable_and_linked_to_the_worker_dashboard() -> None:
    p = by_title(CLUSTER_FILE)["Worker table"]
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
    link = ov[n.LABEL_WORKER_NAME]["links"][0]["url"]
    assert link.startswith(f"/d/{ALL[WORKER_FILE]['uid']}/")
    assert "var-worker=${__value.raw}" in link


def test_bar_chart_renames_every_query() -> None:
    p = by_title(CLUSTER_FILE)["Memory by worker, now"]
    organize = next(t for t in p["transformations"] if t["id"] == "organize")["options"]
    assert sorted(organize["renameByName"]) == sorted(f"Value #{t['refId']}" for t in p["targets"])
    assert p["options"]["xField"] == n.LABEL_WORKER_NAME


def test_pause_annotations() -> None:
    for file in (CLUSTER_FILE, WORKER_FILE):
        annotations = ALL[file]["annotations"]["list"]
        assert annotations[0]["builtIn"] == 1
        paused = next(a for a in annotations if "paused" in a.get("titleFormat", ""))
        assert paused["enable"] is True
        assert n.WORKER_PAUSED in paused["expr"] and paused["expr"].endswith("== 1")


def test_worker_dashboard_shows_process_against_heartbeat_and_heartbeat_age() -> None:
    t = by_title(WORKER_FILE)
    source = t["Process memory by source"]
    exprs_ = [x["expr"] for x in source["targets"]]
    assert exprs_[0].startswith(n.WORKER_PROCESS_BYTES + "{")
    assert exprs_[1].startswith(n.WORKER_HEARTBEAT_PROCESS_BYTES + "{")
    assert "event loop is blocked" in source["description"]
    assert n.WORKER_HEARTBEAT_AGE_SECONDS in t["Heartbeat age"]["targets"][0]["expr"]
    steps = t["Heartbeat age"]["fieldConfig"]["defaults"]["thresholds"]["steps"]
    assert steps[-1]["value"] == 60  # heartbeat_stale_after = 1m


def test_dashboards_link_each_other() -> None:
    for file, other in ((CLUSTER_FILE, WORKER_FILE), (WORKER_FILE, CLUSTER_FILE)):
        (link,) = ALL[file]["links"]
        assert link["url"].startswith(f"/d/{ALL[other]['uid']}/")
        assert link["includeVars"] and link["keepTime"]


# --- provisioning ---------------------------------------------------------------------------------
def test_configmap_carries_both_dashboards_for_the_helm_sidecar() -> None:
    text = render_configmap(CONFIG)
    doc = yaml.safe_load(text)
    assert doc["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert doc["data"] == render_files(CONFIG)
    assert len(text.encode()) < 256 * 1024  # fits kubectl's last-applied annotation
    assert "namespace" not in doc["metadata"]
    namespaced = yaml.safe_load(render_configmap(CONFIG, namespace="monitoring"))
    assert namespaced["metadata"]["namespace"] == "monitoring"


def test_configmap_is_a_valid_kubernetes_object() -> None:
    kubernetes_validate.validate(yaml.safe_load(render_configmap(CONFIG)), "1.30", strict=True)


def test_provider_loads_the_dashboards_from_a_folder() -> None:
    doc = yaml.safe_load(render_provider())
    assert doc["apiVersion"] == 1
    (provider,) = doc["providers"]
    assert provider["type"] == "file" and provider["options"]["path"].startswith("/")
    assert (
        provider["folder"]
        == yaml.safe_load(render_configmap(CONFIG))["metadata"]["annotations"]["grafana_folder"]
    ), "both provisioning routes put the dashboards in one folder"
