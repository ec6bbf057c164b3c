"""Alert and recording rules: committed files, promtool check/test, runbook links, Alertmanager.

The promtool unit tests themselves (cases that must fire and must not) live in tests/rules/;
this module runs them against the committed rule files.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from dask_memory_exporter import names
from dask_memory_exporter.cli import main
from dask_memory_exporter.mixin import MixinConfig
from dask_memory_exporter.rules import (
    ALERTS_FILE,
    PROMETHEUS_RULE_FILE,
    RECORDING_FILE,
    alert_rules,
    cluster_sum,
    duration_seconds,
    render_files,
)
from tests.rules import generate as rule_cases
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
    "DaskWorkerKilledForMemory",
    "DaskWorkerLostUnexpectedly",
    "DaskWorkerBlockedAbovePause",
    "DaskWorkerGPUMemoryHigh",
    "DaskWorkerGPUMemoryExhaustionPredicted",
    "DaskMemoryExporterSchedulerDown",
    "DaskMemoryExporterDown",
}

CLUSTER_WIDE_WORKER_ALERTS = {"DaskWorkerLostUnexpectedly"}
"""Worker alerts of a cluster-wide count (by cause), with no worker label to name."""

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
        # The link must land on this alert's section of the runbooks the exporter serves.
        page, _, anchor = ann["runbook_url"].partition("#")
        assert page == "http://{{ $labels.instance }}/runbooks", ann["runbook_url"]
        assert anchor in anchors, f"{name}: docs/runbooks.md has no section #{anchor}"
        assert _github_anchor(name) == anchor, f"{name} links to another alert's section"
        assert ann["summary"] and ann["description"], name
        duration_seconds(r["for"])
        if name.startswith("DaskWorker") and name not in CLUSTER_WIDE_WORKER_ALERTS:
            assert "$labels.worker_name" in ann["summary"], name
            assert "$labels.worker" in ann["description"], name
            assert "$value" in ann["description"], name


def _github_anchor(heading: str) -> str:
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_expressions_use_the_names_contract_and_selector() -> None:
    """No hard-coded metric names: every dask_memory_* name in a rule is in exporter.names."""
    import dask_memory_exporter.app  # noqa: F401  (every source module, and its metrics)

    known = {str(m) for m in names.declared()}
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


def _groups(text: str) -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = yaml.safe_load(text)["groups"]
    return groups


def test_short_config_reaches_the_evaluated_rules(tmp_path: Path) -> None:
    """promtool evaluates the rules generated from SHORT: its selector keeps another job and
    another namespace out, its ``for:`` durations, pause window and horizon are the ones that
    apply, its extra label is on the alerts, and cluster totals group by its cluster label.
    Every worker has its four threshold series, so the threshold joins must ignore that label."""
    files = render_files(SHORT)
    for name in (ALERTS_FILE, RECORDING_FILE):
        (tmp_path / name).write_text(files[name])
    rules = {r["alert"]: r for r in _rules_of(files[ALERTS_FILE])}
    cluster = {"job": "dask", "namespace": "dask-a", "cluster": "c1"}
    full = {**cluster, **rule_cases.worker("full", 40001)}
    leaking = {**cluster, **rule_cases.worker("leaking", 40002)}
    sudden = {**cluster, **rule_cases.worker("sudden", 40003)}
    steady = {"managed": "0x300", "paused": "0x300", "limit": "1e9x300"}
    high = {"process": "750e6x300", "unmanaged": "700e6x300", "recent": "50e6x300", **steady}
    inputs = [
        *rule_cases.series(full, **high),
        *rule_cases.series({**full, "namespace": "other"}, **high),
        *rule_cases.series({**full, "job": "dask-memory-exporter"}, **high),
        # Unmanaged (old) grows 1e6/s: process plus 60 s of growth passes pause (800e6) after
        # 238 s, process itself only after 298 s.
        *rule_cases.series(
            leaking,
            process="502e6+1e6x300",
            unmanaged="500e6+1e6x300",
            recent="2e6x300",
            **steady,
        ),
        # Flat, then growing 4e6/s from 100 s to 130 s: soon after the start only a short
        # window (15 s) sees the whole rate; a longer one averages in the flat part.
        *rule_cases.series(
            sudden,
            process="602e6x100 606e6+4e6x29 722e6x169",
            unmanaged="600e6x100 604e6+4e6x29 720e6x169",
            recent="2e6x300",
            **steady,
        ),
    ]
    no_data, predicted = "DaskWorkerMemoryHighNoDataToSpill", "DaskWorkerPausePredicted"
    team = {"team": "data"}  # SHORT's alert_extra_labels
    limit_sum = cluster_sum(names.WORKER_LIMIT_BYTES)
    case = {
        "name": "SHORT settings as evaluated",
        "interval": "1s",
        "input_series": [dict(f) for f in inputs],
        "alert_rule_test": [
            rule_cases.check(no_data, "1s"),  # for: 2s
            rule_cases.check(
                no_data, "5s", rule_cases.expect(no_data, {**full, **team}, "75%", rules)
            ),
            # 18 s into the sudden growth: (674e6 + 60 s x 4e6/s) / 1e9 over a 15 s window
            rule_cases.check(
                predicted, "118s", rule_cases.expect(predicted, {**sudden, **team}, "91.4%", rules)
            ),
            rule_cases.check(predicted, "200s"),  # pause 98 s away: beyond the 60 s horizon
            # (752e6 + 60 s x 1e6/s) / 1e9, 11 s after the prediction crossed 80%
            rule_cases.check(
                predicted, "250s", rule_cases.expect(predicted, {**leaking, **team}, "81.2%", rules)
            ),
        ],
        "promql_expr_test": [
            {
                "expr": limit_sum,
                "eval_time": "5s",
                "exp_samples": [rule_cases.sample(limit_sum, {"cluster": "c1"}, 3e9)],
            }
        ],
    }
    doc = {
        "rule_files": [ALERTS_FILE, RECORDING_FILE],
        "evaluation_interval": "1s",
        "tests": [case],
    }
    (tmp_path / "short-test.yaml").write_text(json.dumps(doc))
    _check(run_tool("promtool", "test", "rules", "short-test.yaml", cwd=tmp_path))


def test_prometheus_rule_resource() -> None:
    """The PrometheusRule carries exactly the groups of the two rule files, and its schema
    (the operator's CRD) accepts it."""
    files = render_files(MixinConfig())
    doc = yaml.safe_load(files[PROMETHEUS_RULE_FILE])
    from_files = [g for name in (RECORDING_FILE, ALERTS_FILE) for g in _groups(files[name])]
    assert doc["spec"]["groups"] == from_files
    assert CRD.exists(), f"{CRD} is vendored in the repository"
    import jsonschema

    crd = yaml.safe_load(CRD.read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    # Not jsonschema.validate(): it checks the CRD against the metaschema, which rejects the
    # Go-style "(?i)" patterns that the operator's CRD contains.
    validator = jsonschema.Draft7Validator(version["schema"]["openAPIV3Schema"])
    errors = [f"{list(e.path)}: {e.message}" for e in validator.iter_errors(doc)]
    assert not errors, errors


def test_every_mixin_setting_is_settable_from_the_cli(tmp_path: Path) -> None:
    """`generate rules --set key=value` for every setting, each at its default written as text,
    gives the default rules: no setting has a type the CLI cannot set."""
    sets = []
    for field in dataclasses.fields(MixinConfig):
        default = getattr(MixinConfig(), field.name)
        text = ",".join(default) if isinstance(default, tuple) else str(default)
        sets += ["--set", f"{field.name}={text}"]
    assert main(["generate", "rules", "--output-dir", str(tmp_path), *sets]) == 0
    for name, text in render_files(MixinConfig()).items():
        assert (tmp_path / name).read_text() == text, name


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


@pytest.mark.parametrize("rule", alert_rules(MixinConfig()), ids=lambda r: r["alert"])
def test_every_alert_is_routed_by_its_severity(rule: dict[str, Any]) -> None:
    """amtool routes each generated alert, with its own labels, to a severity receiver."""
    labels = [f"{k}={v}" for k, v in {"alertname": rule["alert"], **rule["labels"]}.items()]
    result = run_tool(
        "amtool", "config", "routes", "test", f"--config.file={ALERTMANAGER_CONFIG}", *labels
    )
    _check(result)
    assert result.stdout.strip() in {"dask-pager", "dask-chat", "dask-tickets"}, result.stdout


def test_every_alert_but_the_slow_ones_can_be_inhibited() -> None:
    """Each alert other than the slow leak and stale heartbeats is named by an inhibit rule
    (Alertmanager has no offline inhibition check; tests/e2e/test_alerts_live.py runs it)."""
    config = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())
    inhibited = {
        m
        for rule in config["inhibit_rules"]
        for m in rule["source_matchers"] + rule["target_matchers"]
    }

    def names(matcher: str) -> bool:
        key, op, value = re.match(r'(\w+)\s*(=~|=)\s*"(.*)"', matcher).groups()  # type: ignore[union-attr]
        return key == "alertname" and (
            re.fullmatch(value, name) is not None if op == "=~" else value == name
        )

    for name in EXPECTED_ALERTS - {"DaskWorkerUnmanagedMemoryGrowing", "DaskWorkerHeartbeatStale"}:
        assert any(names(m) for m in inhibited), name
