"""Alert and recording rules: committed files, promtool check/test, runbook links, Alertmanager.

The promtool unit tests themselves (cases that must fire and must not) live in tests/rules/;
this module runs them against the committed rule files.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml

from dask_memory_exporter import names
from dask_memory_exporter.mixin import MixinConfig
from dask_memory_exporter.rules import (
    ALERTS_FILE,
    PROMETHEUS_RULE_FILE,
    RECORDING_FILE,
    alert_rules,
    duration_seconds,
    render_files,
)
from tests.support.promstack import run_tool

ROOT = Path(__file__).resolve().parents[2]
RULES_DIR = ROOT / "deploy" / "prometheus"
PROMTOOL_TESTS = sorted((ROOT / "tests" / "rules").glob("*.yaml"))
ALERTMANAGER_CONFIG = ROOT / "deploy" / "alertmanager" / "alertmanager.yaml"
RUNBOOKS = ROOT / "docs" / "runbooks.md"
CRD = ROOT / "tests" / "schemas" / "crds" / "monitoring.coreos.com_prometheusrules.yaml"

EXPECTED_ALERTS = {
    "DaskWorkerMemoryHighNoDataToSpill",
    "DaskWorkerPausePredicted",
    "DaskWorkerPaused",
    "DaskWorkerNearTermination",
    "DaskWorkerUnmanagedMemoryGrowing",
    "DaskWorkerHeartbeatStale",
    "DaskMemoryExporterSchedulerDown",
    "DaskMemoryExporterDown",
}

# Short durations as the live test uses them: the generator must produce valid rules for them too.
SHORT = dataclasses.replace(
    MixinConfig(),
    no_data_to_spill_for="2s",
    pause_predicted_window="15s",
    pause_predicted_recent_window="5s",
    pause_predicted_horizon="60s",
    pause_predicted_for="2s",
    paused_for="1s",
    exporter_selector='job="dask", namespace=~"dask-.*"',
    cluster_labels=("cluster",),
    alert_extra_labels=("team=data",),
)


def _rules_of(text: str) -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load(text)["groups"] for r in g["rules"]]


def _check(result: Any) -> None:
    assert result.returncode == 0, result.stdout + result.stderr


def test_committed_files_match_generator() -> None:
    """deploy/prometheus/ is generated: regenerate it after changing rules.py or MixinConfig."""
    expected = render_files(MixinConfig())
    assert sorted(p.name for p in RULES_DIR.iterdir()) == sorted(expected)
    for name, text in expected.items():
        assert (RULES_DIR / name).read_text() == text, f"{name} is stale: regenerate it"


def test_render_is_deterministic_and_pure() -> None:
    assert render_files(MixinConfig()) == render_files(MixinConfig())
    assert set(render_files(SHORT)) == {ALERTS_FILE, RECORDING_FILE, PROMETHEUS_RULE_FILE}


@pytest.mark.parametrize("config", [MixinConfig(), SHORT], ids=["defaults", "short"])
def test_promtool_check_rules(config: MixinConfig, tmp_path: Path) -> None:
    files = render_files(config)
    paths = []
    for name in (ALERTS_FILE, RECORDING_FILE):
        (tmp_path / name).write_text(files[name])
        paths.append(tmp_path / name)
    # The PrometheusRule's spec is a rule file too.
    spec = yaml.safe_load(files[PROMETHEUS_RULE_FILE])["spec"]
    (tmp_path / "from-crd.yaml").write_text(yaml.safe_dump(spec))
    paths.append(tmp_path / "from-crd.yaml")
    _check(run_tool("promtool", "check", "rules", *paths))


def test_committed_rules_pass_promtool_check() -> None:
    _check(
        run_tool("promtool", "check", "rules", RULES_DIR / ALERTS_FILE, RULES_DIR / RECORDING_FILE)
    )


@pytest.mark.parametrize("test_file", PROMTOOL_TESTS, ids=lambda p: p.name)
def test_promtool_unit_tests(test_file: Path) -> None:
    """tests/rules/*.yaml: each case must fire, or must stay silent, as its name says."""
    result = run_tool("promtool", "test", "rules", test_file.name, cwd=test_file.parent)
    _check(result)


def test_promtool_tests_exist_for_both_groups() -> None:
    assert {p.name for p in PROMTOOL_TESTS} >= {"alerts-test.yaml", "recording-test.yaml"}
    covered = set()
    for p in PROMTOOL_TESTS:
        for t in yaml.safe_load(p.read_text())["tests"]:
            for case in t.get("alert_rule_test", []):
                if case.get("exp_alerts"):
                    covered.add(case["alertname"])
    assert covered == EXPECTED_ALERTS, "every alert needs a promtool case where it fires"


def test_alerts_have_severity_annotations_and_runbook_links() -> None:
    config = MixinConfig()
    rules = _rules_of(render_files(config)[ALERTS_FILE])
    assert {r["alert"] for r in rules} == EXPECTED_ALERTS
    runbook_text = RUNBOOKS.read_text()
    anchors = {_github_anchor(h) for h in re.findall(r"^#+ (.+)$", runbook_text, re.M)}
    for r in rules:
        name = r["alert"]
        assert r["labels"]["severity"] in {"critical", "warning", "info"}, name
        ann = r["annotations"]
        assert ann["runbook_url"] == f"{config.runbook_url_base}#{name.lower()}"
        assert name.lower() in anchors, f"docs/runbooks.md has no section {name}"
        assert ann["summary"] and ann["description"], name
        duration_seconds(r["for"])
        if name.startswith("DaskWorker"):
            assert "$labels.worker_name" in ann["summary"], name
            assert "$labels.worker" in ann["description"], name
            assert "$value" in ann["description"], name


def _github_anchor(heading: str) -> str:
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_expressions_use_the_names_contract_and_selector() -> None:
    """No hard-coded metric names: every dask_memory_* name in a rule is in exporter.names."""
    known = {v for k, v in vars(names).items() if k.isupper() and isinstance(v, str)}
    for config in (MixinConfig(), SHORT):
        files = render_files(config)
        for r in _rules_of(files[ALERTS_FILE]) + _rules_of(files[RECORDING_FILE]):
            expr = r["expr"]
            used = set(re.findall(r"\b(dask_memory_\w+)\b", expr)) - {
                m for m in re.findall(r":(dask_memory_\w+)", r.get("record", ""))
            }
            assert used <= known, (r.get("alert") or r.get("record"), used - known)
            # every selector carries the configured matchers
            for sel in re.findall(r"(?:dask_memory_\w+|\bup)(\{[^}]*\})", expr):
                assert config.exporter_selector in sel, (expr, sel)


def test_threshold_joins_ignore_the_threshold_label() -> None:
    for r in alert_rules(MixinConfig()):
        if names.WORKER_THRESHOLD_RATIO in r["expr"]:
            n_ratio = r["expr"].count(names.WORKER_THRESHOLD_RATIO)
            assert r["expr"].count("ignoring(threshold)") == n_ratio, r["alert"]
            assert 'threshold="' in r["expr"], r["alert"]


def test_short_config_overrides_reach_the_rules() -> None:
    rules = {r["alert"]: r for r in _rules_of(render_files(SHORT)[ALERTS_FILE])}
    assert rules["DaskWorkerMemoryHighNoDataToSpill"]["for"] == "2s"
    assert "[15s]" in rules["DaskWorkerPausePredicted"]["expr"]
    assert "* 60)" in rules["DaskWorkerPausePredicted"]["expr"]
    assert all(r["labels"]["team"] == "data" for r in rules.values())
    recording = _rules_of(render_files(SHORT)[RECORDING_FILE])
    assert all(
        "by (cluster)" in r["expr"] for r in recording if r["record"].startswith("dask_cluster:")
    )


def test_prometheus_rule_resource() -> None:
    doc = yaml.safe_load(render_files(MixinConfig())[PROMETHEUS_RULE_FILE])
    assert doc["apiVersion"] == "monitoring.coreos.com/v1" and doc["kind"] == "PrometheusRule"
    assert doc["metadata"]["name"] == "dask-memory-exporter"
    assert [g["name"] for g in doc["spec"]["groups"]] == [
        "dask-memory-exporter.rules",
        "dask-memory-exporter.alerts",
    ]
    assert CRD.exists(), f"{CRD} is vendored in the repository"
    import jsonschema

    crd = yaml.safe_load(CRD.read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    # Not jsonschema.validate(): it checks the CRD against the metaschema, which rejects the
    # Go-style "(?i)" patterns that the operator's CRD contains.
    validator = jsonschema.Draft7Validator(version["schema"]["openAPIV3Schema"])
    errors = [f"{list(e.path)}: {e.message}" for e in validator.iter_errors(doc)]
    assert not errors, errors


def test_mixin_field_types_are_cli_settable() -> None:
    """`generate rules --set key=value` coerces by type: keep to str/int/float/bool/tuple[str]."""
    allowed = (str, int, float, bool, tuple[str, ...])
    for name, hint in typing.get_type_hints(MixinConfig).items():
        assert hint in allowed, (name, hint)


@pytest.mark.parametrize(
    ("text", "seconds"), [("0s", 0), ("90s", 90), ("1h30m", 5400), ("500ms", 0.5), ("4h", 14400)]
)
def test_duration_seconds(text: str, seconds: float) -> None:
    assert duration_seconds(text) == seconds


@pytest.mark.parametrize("bad", ["", "5", "1 h", "-1m", "1.5h"])
def test_bad_duration_is_rejected(bad: str) -> None:
    with pytest.raises(ValueError):
        duration_seconds(bad)
    with pytest.raises(ValueError):
        render_files(dataclasses.replace(MixinConfig(), paused_for=bad))


def test_bad_extra_labels_are_rejected() -> None:
    with pytest.raises(ValueError, match="key=value"):
        render_files(dataclasses.replace(MixinConfig(), alert_extra_labels=("team",)))


def test_alertmanager_config_is_valid() -> None:
    _check(run_tool("amtool", "check-config", ALERTMANAGER_CONFIG))


@pytest.mark.parametrize(
    ("labels", "receiver"),
    [
        (["severity=critical", "alertname=DaskWorkerNearTermination"], "dask-pager"),
        (["severity=warning", "alertname=DaskWorkerPausePredicted"], "dask-chat"),
        (["severity=info", "alertname=DaskWorkerUnmanagedMemoryGrowing"], "dask-tickets"),
        (["alertname=SomethingElse"], "dask-default"),
    ],
)
def test_alertmanager_routes_by_severity(labels: list[str], receiver: str) -> None:
    _check(
        run_tool(
            "amtool",
            "config",
            "routes",
            "test",
            f"--config.file={ALERTMANAGER_CONFIG}",
            f"--verify.receivers={receiver}",
            *labels,
        )
    )


def test_every_severity_in_the_rules_has_a_route() -> None:
    config = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())
    routed = {
        m.split("=", 1)[1].strip('"')
        for route in config["route"]["routes"]
        for m in route.get("matchers", [])
        if m.startswith("severity=")
    }
    severities = {r["labels"]["severity"] for r in alert_rules(MixinConfig())}
    assert severities <= routed
    inhibited = {
        m
        for rule in config["inhibit_rules"]
        for m in rule["source_matchers"] + rule["target_matchers"]
    }
    for name in EXPECTED_ALERTS - {"DaskWorkerUnmanagedMemoryGrowing", "DaskWorkerHeartbeatStale"}:
        assert any(name in m for m in inhibited), name
