"""Dashboards, live: every query of every panel runs on real data from the demo workload.

``dask-memory-exporter demo`` (a real LocalCluster: one worker leaks until it pauses, one
spills, one idles) is scraped every second by a real Prometheus 2.42 that also evaluates the
generated recording rules. Once the workload shows up (three workers, data spilled, the leaking
worker paused, the recording rules evaluated), every panel target, annotation and variable query
of both generated dashboards is run at one instant (and, where Grafana draws it over time, as
a range query too) with the template variables substituted as Grafana would (All; one value
regex-escaped; two values as ``(a|b)``), for the default configuration and for
``dashboard_recording_rules=False``. None may fail to parse or evaluate; none may come back
empty, except the few listed in ``MAY_BE_EMPTY`` with the reason. Then the figures the panels
would show are checked against the workload: three workers, the leaking one paused, the
spilling one with data on disk, process = managed + unmanaged + recent in every table row,
thresholds in Dask's order below the limit, variables listing what the workload has.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dask_memory_exporter import names as n
from dask_memory_exporter.dashboards import CLUSTER_FILE, WORKER_FILE, render_files
from dask_memory_exporter.mixin import MixinConfig
from dask_memory_exporter.rules import cluster_sum
from dask_memory_exporter.rules import render_files as render_rules
from tests.support.demo import run_demo
from tests.support.promstack import (
    Prometheus,
    PromStackError,
    Sample,
    free_port,
    run_prometheus,
)

ROOT = Path(__file__).resolve().parents[2]
MiB = 2**20
NAMESPACE = "dask-demo"
WORKER = "leak"

# (file, panel or annotation title, refId) -> why it may legitimately be empty here.
MAY_BE_EMPTY = {
    (CLUSTER_FILE, "Alert list", "A"): "no alert has fired yet: the rules' for: is minutes",
    (CLUSTER_FILE, "annotation: Dask alerts", ""): "no alert has fired yet",
    (WORKER_FILE, "annotation: Dask alerts", ""): "no alert has fired yet",
    (WORKER_FILE, "Process memory by source", "B"): (
        "sidecar-only series; the demo runs in scheduler mode"
    ),
    # Only the gateway mode labels series with cluster (tests/e2e/test_gateway.py); the
    # variable is then empty and All (.*) also matches series without the label.
    (CLUSTER_FILE, "variable: cluster", ""): "the demo is not behind a dask-gateway",
    (WORKER_FILE, "variable: cluster", ""): "the demo is not behind a dask-gateway",
}


@dataclasses.dataclass(frozen=True)
class Query:
    file: str
    title: str
    ref: str
    expr: str
    range: bool  # Grafana runs it as a range query (time series, annotations)

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.file, self.title, self.ref)


def queries(doc: dict[str, Any], file: str) -> Iterator[Query]:
    """Every PromQL expression of a dashboard: panel targets, annotations, variables."""

    def walk(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for p in panels:
            yield p
            yield from walk(p.get("panels", []))

    for panel in walk(doc["panels"]):
        for t in panel.get("targets", []):
            yield Query(file, panel["title"], t["refId"], t["expr"], not t.get("instant", False))
    for a in doc["annotations"]["list"]:
        if "expr" in a:
            yield Query(file, f"annotation: {a['name']}", "", a["expr"], True)
    for v in doc["templating"]["list"]:
        if v["type"] == "query":
            yield Query(file, f"variable: {v['name']}", "", v["query"], False)


def gpu_row_queries(doc: dict[str, Any], file: str) -> Iterator[Query]:
    """The queries of the GPU row (repeated over the ``gpu`` variable) and of that variable."""
    rows = [p for p in doc["panels"] if p["type"] == "row" and p.get("repeat") == "gpu"]
    gpu = {(file, panel["title"]) for row in rows for panel in row.get("panels", [])}
    for q in queries(doc, file):
        if (file, q.title) in gpu or q.title == "variable: gpu":
            yield q


def grafana_regex_escape(value: str) -> str:
    """What Grafana's Prometheus data source does to a single value in a ``=~`` matcher."""
    return re.sub(r"([\\^$*+?.()|\[\]{}])", r"\\\\\1", value)


def substitute(expr: str, values: dict[str, str]) -> str:
    out = expr
    for name in sorted(values, key=len, reverse=True):
        out = out.replace("${" + name + "}", values[name]).replace("$" + name, values[name])
    assert "$" not in out, f"unsubstituted variable in {out!r}"
    return out


LABEL_VALUES = re.compile(r"^label_values\((?P<sel>.*), *(?P<label>\w+)\)$", re.S)


def run(prom: Prometheus, q: Query, values: dict[str, str], at: float) -> list[Sample]:
    """Run one query as Grafana would, at unix time ``at``; raises PromStackError on an error.

    A ``label_values(selector, label)`` variable query returns the series carrying ``label``.
    A range query (over the 20 s before ``at``, 1 s step) must agree with the instant one on
    being empty or not; the instant result is returned.
    """
    expr = substitute(q.expr, values)
    m = LABEL_VALUES.match(expr)
    if m:
        return [s for s in prom.query(m["sel"], at) if m["label"] in s.labels]
    instant = prom.query(expr, at)
    if q.range:
        series = prom.query_range(expr, at - 20, at, step=1)
        assert bool(series) == bool(instant), f"range and instant disagree: {expr}"
    return instant


def demo(port: int, log: Path) -> contextlib.AbstractContextManager[subprocess.Popen[bytes]]:
    """The demo, leaking fast (the leaking worker pauses within seconds); stopped on exit."""
    return run_demo(port, log, "--memory-limit", "300MiB", "--leak-rate", "40MiB")


@pytest.mark.timeout(180)
def test_every_dashboard_query_returns_data_on_the_demo(tmp_path: Path) -> None:
    started = time.monotonic()
    port = free_port()
    config = MixinConfig()
    with (
        demo(port, tmp_path / "demo.log") as proc,
        run_prometheus(
            scrape_targets=[f"127.0.0.1:{port}"],
            rule_texts=render_rules(config),
            target_labels={"namespace": NAMESPACE},
        ) as prom,
    ):
        sel = config.selector()

        def wait(expr: str, what: str, timeout: float = 60) -> None:
            try:
                prom.wait_for(expr, timeout=timeout)
            except AssertionError as e:
                log = (tmp_path / "demo.log").read_text(errors="replace")[-3000:]
                raise AssertionError(f"{what}: {e}\ndemo exited: {proc.poll()}\n{log}") from e

        wait(f"count({n.WORKER_PROCESS_BYTES}{sel}) == 3", "three workers")
        wait(f'{n.WORKER_SPILLED_BYTES}{{worker_name="spill"}} > 0', "spilled data")
        wait(f'{n.WORKER_PAUSED}{{worker_name="{WORKER}"}} == 1', "the leaking worker paused")
        wait(f"{cluster_sum(n.WORKER_SPILLED_BYTES)} > 0", "recording rules evaluated")
        data_at = time.monotonic() - started
        instance = f"127.0.0.1:{port}"
        job = prom.query(f"{n.SCHEDULER_UP}{sel}")[0].labels["job"]

        grafana = {"__rate_interval": "4s", "__interval": "1s", "__range": "5m", "datasource": ""}
        every = {"namespace": ".*", "job": ".*", "instance": ".*", "cluster": ".*"}
        chosen = {
            "cluster": ".*",  # no value to choose: only All
            "namespace": grafana_regex_escape(NAMESPACE),
            "job": grafana_regex_escape(job),
            "instance": grafana_regex_escape(instance),
        }
        # (config, cluster variables, worker variable per file): everything on All; chosen
        # values as Grafana formats them (one value regex-escaped, two values as (a|b));
        # raw sums instead of the recording rules.
        variants = [
            (config, {**grafana, **every}, {CLUSTER_FILE: ".*", WORKER_FILE: WORKER}),
            (config, {**grafana, **chosen}, {CLUSTER_FILE: "(leak|spill)", WORKER_FILE: WORKER}),
            (
                dataclasses.replace(config, dashboard_recording_rules=False),
                {**grafana, **every},
                {CLUSTER_FILE: ".*", WORKER_FILE: WORKER},
            ),
        ]
        at = time.time()  # after the waits: every condition above holds at this instant
        failures: list[str] = []
        results: dict[tuple[str, str, str], list[Sample]] = {}  # default config, All
        count = 0
        gpu_keys = {
            q.key
            for file, text in render_files(config).items()
            for q in gpu_row_queries(json.loads(text), file)
        }
        for i, (cfg, values, worker_by_file) in enumerate(variants):
            for file, text in render_files(cfg).items():
                for q in queries(json.loads(text), file):
                    count += 1
                    subst = {**values, "worker": worker_by_file[file]}
                    where = f"{file} / {q.title} / {q.ref} (variant {i})"
                    try:
                        result = run(prom, q, subst, at)
                    except (PromStackError, AssertionError) as e:
                        failures.append(f"{where}: {e}")
                        continue
                    if i == 0:
                        results[q.key] = result
                    if q.key in gpu_keys:
                        # The demo has no GPU worker: the GPU row's variable and panels are
                        # empty, so Grafana has no row to repeat (test_gpu_dashboard.py runs
                        # them on a GPU-keyed worker).
                        if result:
                            failures.append(f"{where}: GPU query not empty: {result}")
                        continue
                    if not result and q.key not in MAY_BE_EMPTY:
                        failures.append(f"{where}: empty: {substitute(q.expr, subst)}")
        elapsed = time.monotonic() - started
        print(f"{count} queries; data after {data_at:.1f}s; total {elapsed:.1f}s")
        assert not failures, "\n".join(failures)
        assert not set(MAY_BE_EMPTY) - set(results), "MAY_BE_EMPTY names queries that are gone"
        check_values(results)


def check_values(results: dict[tuple[str, str, str], list[Sample]]) -> None:
    """The figures the panels show agree with the workload and with each other."""

    def one(file: str, title: str, ref: str = "A") -> float:
        (sample,) = results[(file, title, ref)]
        return sample.value

    def label_values(file: str, variable: str, label: str) -> set[str]:
        return {s.labels[label] for s in results[(file, f"variable: {variable}", "")]}

    for file in (CLUSTER_FILE, WORKER_FILE):
        assert label_values(file, "namespace", "namespace") == {NAMESPACE}
        assert label_values(file, "job", "job") == {"dask-memory-exporter"}
        assert label_values(file, "worker", n.LABEL_WORKER_NAME) == {"idle", "leak", "spill"}

    assert one(CLUSTER_FILE, "Workers") == 3
    assert one(CLUSTER_FILE, "Paused workers") >= 1
    assert one(CLUSTER_FILE, "Firing alerts") >= 0
    assert one(CLUSTER_FILE, "Scheduler") == 1

    # the worker table, as Grafana's merge transformation joins it (all queries at one instant)
    columns = ["process", "managed", "old", "recent", "spilled", "limit", "share", "paused", "age"]
    table: dict[str, dict[str, float]] = {}
    for col, ref in zip(columns, "ABCDEFGHI", strict=True):
        for s in results[(CLUSTER_FILE, "Worker table", ref)]:
            table.setdefault(s.labels[n.LABEL_WORKER_NAME], {})[col] = s.value
    assert sorted(table) == ["idle", "leak", "spill"]
    for name, row in table.items():
        assert len(row) == len(columns), (name, row)
        assert row["process"] == row["managed"] + row["old"] + row["recent"], (name, row)
        assert row["limit"] == 300 * MiB
        assert row["share"] == pytest.approx(row["process"] / row["limit"])
    assert table["leak"]["paused"] == 1 and table["idle"]["paused"] == 0
    assert table["spill"]["spilled"] > 0 and table["spill"]["managed"] > 0

    # the worker dashboard's threshold lines, in bytes, in Dask's order, below the limit
    levels = {s.labels[n.LABEL_THRESHOLD]: s.value for s in results[(WORKER_FILE, "Memory", "F")]}
    assert sorted(levels, key=levels.__getitem__) == list(n.THRESHOLDS)
    assert max(levels.values()) < table[WORKER]["limit"]
    assert one(WORKER_FILE, "Status") == 1
