"""Alert and recording rules as Python data, rendered from a :class:`MixinConfig`.

Covers the Prometheus rule files committed under ``deploy/prometheus/`` (one file of alerts,
one of recording rules, and both as a prometheus-operator ``PrometheusRule``). Pure: no I/O,
deterministic YAML. Metric names come from :mod:`dask_memory_exporter.names`; windows, ``for:``
durations, severities and selectors from the MixinConfig. Memory thresholds are never
constants here: each rule reads ``dask_memory_worker_threshold_ratio{threshold=...}`` and
``dask_memory_worker_limit_bytes`` from the exporter, so a cluster with other Dask settings is
judged by its own. A worker without a memory limit has neither series, so the memory alerts
ignore it (Dask does not manage its memory either). The reasoning behind each expression is in
``docs/alerts.md``; what to do when one fires is in ``docs/runbooks.md``. Needs Prometheus
2.11 or later (``humanizePercentage`` in annotations; the PromQL itself is older, with no
subqueries and no ``mad_over_time``); tested with 2.42.
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Iterable
from typing import Any

from . import heartbeat as hb
from . import names as n
from . import yamlio
from .mixin import MixinConfig

__all__ = [
    "ALERTS_FILE",
    "ALERT_GROUP",
    "CLUSTER_PAUSED_WORKERS",
    "CLUSTER_WORKERS",
    "PROMETHEUS_RULE_FILE",
    "RECORDING_FILE",
    "RECORDING_GROUP",
    "STILL_GROWING",
    "WORKER_LIVE_LIMIT_RATIO",
    "WORKER_PROBE_SECONDS",
    "WORKER_PROCESS_LIMIT_RATIO",
    "WORKER_THRESHOLD_BYTES",
    "add_runbook_links",
    "alert_rules",
    "cluster_sum",
    "duration_seconds",
    "prometheus_rule",
    "recording_rules",
    "render_files",
    "rule_groups",
]

ALERTS_FILE = "dask-memory-alerts.yaml"
RECORDING_FILE = "dask-memory-recording.yaml"
PROMETHEUS_RULE_FILE = "prometheusrule.yaml"
ALERT_GROUP = "dask-memory-exporter.alerts"
RECORDING_GROUP = "dask-memory-exporter.rules"

# --- recorded series (level:metric:operations) ----------------------------------------------
# Each is read by a dashboard (with dashboard_recording_rules) or an alert, and the dashboards
# read no other: tests/unit/test_dashboards.py checks both ways. Use these names, never retype
# them.
CLUSTER_WORKERS = "dask_cluster:dask_memory_workers:count"
"""Workers per cluster (series of dask_memory_worker_process_bytes)."""
CLUSTER_PAUSED_WORKERS = "dask_cluster:dask_memory_worker_paused:sum"
"""Paused workers per cluster."""
WORKER_PROCESS_LIMIT_RATIO = "dask_worker:dask_memory_worker_process_bytes:ratio"
"""Process memory / memory limit per worker (workers with a limit only): the dashboards'
"Process memory of limit" graphs."""
WORKER_THRESHOLD_BYTES = "dask_worker:dask_memory_worker_threshold_bytes"
"""Each memory-manager threshold in bytes (limit x ratio), label ``threshold`` kept: the
threshold lines over the dashboards' stacked memory graphs."""
WORKER_LIVE_LIMIT_RATIO = "dask_worker:dask_memory_worker_rss_bytes:ratio"
"""A worker sidecar's direct RSS over the worker's memory limit from the scheduler-mode
exporter, joined by ``worker_name``: live while the worker's event loop is blocked."""
WORKER_PROBE_SECONDS = "dask_worker:dask_memory_worker_event_loop_probe_seconds:max"
"""A worker sidecar's event-loop probe, by ``worker_name`` (the join key of the above)."""

_SUMMED = (
    n.WORKER_MANAGED_BYTES,
    n.WORKER_UNMANAGED_BYTES,
    n.WORKER_UNMANAGED_RECENT_BYTES,
    n.WORKER_SPILLED_BYTES,
    n.WORKER_LIMIT_BYTES,
)
"""Families recorded per cluster by :func:`cluster_sum`: the stacked cluster memory graph."""


STILL_GROWING = 0.5
"""A trend counts only while the recent growth rate is at least this fraction of the long one."""


def cluster_sum(metric: str) -> str:
    """Recorded per-cluster sum of a per-worker family, e.g. ``dask_cluster:<metric>:sum``."""
    return f"dask_cluster:{metric}:sum"


_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
_DURATION = re.compile(r"^((\d+)(ms|s|m|h|d|w|y))+$")


def duration_seconds(text: str) -> float:
    """Seconds in a Prometheus duration such as ``90s``, ``1h30m`` or ``0s``."""
    if not _DURATION.match(text):
        raise ValueError(f"not a Prometheus duration: {text!r}")
    return sum(int(num) * _UNITS[unit] for num, unit in re.findall(r"(\d+)(ms|s|m|h|d|w|y)", text))


def _num(x: float) -> str:
    """A number as PromQL text without a useless ``.0``."""
    return str(int(x)) if float(x).is_integer() else repr(float(x))


class _Q:
    """PromQL fragments for one MixinConfig."""

    def __init__(self, config: MixinConfig) -> None:
        self.c = config
        sel = config.selector()
        self.process = n.WORKER_PROCESS_BYTES + sel
        self.managed = n.WORKER_MANAGED_BYTES + sel
        self.unmanaged = n.WORKER_UNMANAGED_BYTES + sel
        self.limit = n.WORKER_LIMIT_BYTES + sel
        self.paused = n.WORKER_PAUSED + sel
        self.heartbeat_age = n.WORKER_HEARTBEAT_AGE_SECONDS + sel
        self.scheduler_up = n.SCHEDULER_UP + sel
        self.up = "up" + sel
        self.gpu_used = hb.WORKER_GPU_MEMORY_USED_BYTES + sel
        self.gpu_total = hb.WORKER_GPU_MEMORY_TOTAL_BYTES + sel
        self.gpu_limit = hb.WORKER_GPU_MEMORY_LIMIT_BYTES + sel
        self.rmm_used = hb.WORKER_GPU_RMM_USED_BYTES + sel
        self.rmm_pool = hb.WORKER_GPU_RMM_POOL_BYTES + sel

    @property
    def gpu_in_use(self) -> str:
        """Device memory in use: NVML's used figure less the free part of an RMM pool (a pool
        reserves its memory up front, and NVML counts the reservation as used)."""
        return f"(({self.gpu_used} - ({self.rmm_pool} - {self.rmm_used})) or {self.gpu_used})"

    def ratio(self, threshold: str) -> str:
        """``dask_memory_worker_threshold_ratio`` of one threshold."""
        return n.WORKER_THRESHOLD_RATIO + self.c.selector(f'{n.LABEL_THRESHOLD}="{threshold}"')

    @property
    def target(self) -> str:
        """The target ratio, or the spill ratio where target is disabled (as Dask falls back)."""
        return (
            f"({self.ratio(n.THRESHOLD_TARGET)} "
            f"or {self.on_threshold} {self.ratio(n.THRESHOLD_SPILL)})"
        )

    @property
    def on_threshold(self) -> str:
        """Matching clause joining a per-worker vector with one threshold's ratio."""
        return f"ignoring({n.LABEL_THRESHOLD})"


def _expr(text: str) -> str:
    return textwrap.dedent(text).strip()


def _labels(pairs: Iterable[str], what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in pairs:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{what}: expected key=value, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def recording_rules(config: MixinConfig) -> list[dict[str, Any]]:
    """Per-cluster totals and per-worker series the dashboards read."""
    q = _Q(config)
    by = config.cluster_by
    sel = config.selector()
    rules: list[dict[str, Any]] = [
        {"record": cluster_sum(metric), "expr": f"sum by ({by}) ({metric}{sel})"}
        for metric in _SUMMED
    ]
    rules += [
        {"record": CLUSTER_WORKERS, "expr": f"count by ({by}) ({q.process})"},
        {"record": CLUSTER_PAUSED_WORKERS, "expr": f"sum by ({by}) ({q.paused})"},
        {"record": WORKER_PROCESS_LIMIT_RATIO, "expr": f"{q.process} / {q.limit}"},
        {
            "record": WORKER_THRESHOLD_BYTES,
            "expr": (
                f"{q.limit} * {q.on_threshold} group_right "
                f"{n.WORKER_THRESHOLD_RATIO}{config.selector()}"
            ),
        },
    ]
    # A worker sidecar (mode local) exports direct RSS and its event-loop probe under its own
    # instance, with worker="" and worker_name: joined with the breakdown by worker_name.
    wby = config.worker_by
    rules += [
        {
            "record": WORKER_LIVE_LIMIT_RATIO,
            "expr": _expr(
                f"""
                max by ({wby}) ({n.WORKER_RSS_BYTES}{sel})
                  / on({wby})
                max by ({wby}) ({q.limit})
                """
            ),
        },
        {
            "record": WORKER_PROBE_SECONDS,
            "expr": f"max by ({wby}) ({n.WORKER_EVENT_LOOP_PROBE_SECONDS}{sel})",
        },
    ]
    return rules


def _alert(
    name: str,
    expr: str,
    for_: str,
    severity: str,
    summary: str,
    description: str,
    config: MixinConfig,
) -> dict[str, Any]:
    duration_seconds(for_)  # validate
    labels = {"severity": severity, **_labels(config.alert_extra_labels, "alert_extra_labels")}
    return {
        "alert": name,
        "expr": expr,
        "for": for_,
        "labels": labels,
        "annotations": {"summary": summary, "description": description},
    }


_WORKER = "{{ $labels.worker_name }} ({{ $labels.worker }})"


def alert_rules(config: MixinConfig) -> list[dict[str, Any]]:
    """The alerts, without runbook links (see :func:`add_runbook_links`)."""
    c = config
    q = _Q(c)
    on = q.on_threshold
    horizon = duration_seconds(c.pause_predicted_horizon)
    growth_horizon = duration_seconds(c.unmanaged_growing_horizon)
    stale_after = duration_seconds(c.heartbeat_stale_after)
    gpu_horizon = duration_seconds(c.gpu_exhaustion_horizon)
    duration_seconds(c.gpu_exhaustion_window)
    duration_seconds(c.gpu_exhaustion_recent_window)
    duration_seconds(c.pause_predicted_window)
    growth_window = c.unmanaged_growing_window
    duration_seconds(growth_window)
    duration_seconds(c.unmanaged_growing_recent_window)
    duration_seconds(c.pause_predicted_recent_window)

    alerts = [
        _alert(
            "DaskWorkerMemoryHighNoDataToSpill",
            _expr(
                f"""
                (
                  ({q.process} - {q.managed}) / {q.limit}
                    > {on} {q.target}
                )
                and
                (
                  {q.process} / {q.limit}
                    > {on} {q.ratio(n.THRESHOLD_SPILL)}
                )
                """
            ),
            c.no_data_to_spill_for,
            c.no_data_to_spill_severity,
            "Dask worker {{ $labels.worker_name }} is above the spill threshold "
            "with too little managed data to spill.",
            f"Worker {_WORKER} is above its spill threshold, and "
            "{{ $value | humanizePercentage }} of its memory limit is unmanaged memory "
            "(old and recent) that spilling cannot free: even with every managed key spilled "
            "to disk it would stay above its target threshold. This is what Dask logs as "
            '"Unmanaged memory use is high". If it keeps growing, the worker pauses at its pause '
            "threshold.",
            c,
        ),
        _alert(
            "DaskWorkerPausePredicted",
            _expr(
                f"""
                (
                  ({q.process} + deriv({q.unmanaged}[{c.pause_predicted_window}]) * {_num(horizon)})
                    / {q.limit}
                    > {on} {q.ratio(n.THRESHOLD_PAUSE)}
                )
                and
                (deriv({q.unmanaged}[{c.pause_predicted_window}]) > 0)
                and
                (
                  deriv({q.unmanaged}[{c.pause_predicted_recent_window}])
                    > {_num(STILL_GROWING)} * deriv({q.unmanaged}[{c.pause_predicted_window}])
                )
                and
                ({q.paused} == 0)
                """
            ),
            c.pause_predicted_for,
            c.pause_predicted_severity,
            f"Dask worker {{{{ $labels.worker_name }}}} is predicted to pause within "
            f"{c.pause_predicted_horizon}.",
            f"Unmanaged (old) memory of worker {_WORKER} has grown steadily over the last "
            f"{c.pause_predicted_window}. At that rate its process memory reaches "
            f"{{{{ $value | humanizePercentage }}}} of its memory limit within "
            f"{c.pause_predicted_horizon}, past its pause threshold; a paused worker runs no new "
            "tasks.",
            c,
        ),
        _alert(
            "DaskWorkerPaused",
            _expr(
                f"""
                ({q.process} / {q.limit})
                and
                ({q.paused} == 1)
                """
            ),
            c.paused_for,
            c.paused_severity,
            "Dask worker {{ $labels.worker_name }} is paused.",
            f"Worker {_WORKER} has been paused for more than {c.paused_for}: its process "
            "memory ({{ $value | humanizePercentage }} of its limit) is above the pause "
            "threshold, so it starts no new tasks and fetches no data.",
            c,
        ),
        _alert(
            "DaskWorkerNearTermination",
            _expr(
                f"""
                {q.process} / {q.limit}
                  > {on} ({q.ratio(n.THRESHOLD_TERMINATE)} - {_num(c.near_termination_margin)})
                """
            ),
            c.near_termination_for,
            c.near_termination_severity,
            "Dask worker {{ $labels.worker_name }} is about to be restarted by its nanny.",
            f"Process memory of worker {_WORKER} is at "
            "{{ $value | humanizePercentage }} of its limit, within "
            f"{c.near_termination_margin:.0%} of the limit below the terminate threshold. "
            "Above that the nanny kills the worker; its tasks are recomputed elsewhere, and "
            "after repeated deaths they fail with KilledWorker.",
            c,
        ),
        _alert(
            "DaskWorkerUnmanagedMemoryGrowing",
            _expr(
                f"""
                (
                  predict_linear({q.unmanaged}[{growth_window}], {_num(growth_horizon)})
                    / {q.limit}
                    > {on} {q.target}
                )
                and
                (
                  deriv({q.unmanaged}[{growth_window}]) * {_num(growth_horizon)}
                    / {q.limit}
                    > {_num(c.unmanaged_growing_min_ratio)}
                )
                and
                (
                  deriv({q.unmanaged}[{c.unmanaged_growing_recent_window}])
                    > {_num(STILL_GROWING)} * deriv({q.unmanaged}[{growth_window}])
                )
                """
            ),
            c.unmanaged_growing_for,
            c.unmanaged_growing_severity,
            "Unmanaged memory of Dask worker {{ $labels.worker_name }} keeps growing.",
            f"Unmanaged (old) memory of worker {_WORKER} has grown steadily over the last "
            f"{c.unmanaged_growing_window} and is still growing; at this rate it reaches "
            f"{{{{ $value | humanizePercentage }}}} of the memory limit within "
            f"{c.unmanaged_growing_horizon}, past the target threshold. A leak, or memory the "
            "allocator does not return to the operating system.",
            c,
        ),
        _alert(
            "DaskWorkerBlockedAbovePause",
            _expr(
                f"""
                (
                  {WORKER_LIVE_LIMIT_RATIO}{c.selector()}
                    > on({c.worker_by})
                  max by ({c.worker_by}) ({q.ratio(n.THRESHOLD_PAUSE)})
                )
                and on({c.worker_by})
                ({WORKER_PROBE_SECONDS}{c.selector()} > {_num(c.blocked_above_pause_probe_seconds)})
                """
            ),
            c.blocked_above_pause_for,
            c.blocked_above_pause_severity,
            "Dask worker {{ $labels.worker_name }} is blocked above its pause threshold.",
            "Worker {{ $labels.worker_name }}: its event loop has not answered its sidecar's "
            f"probe for more than {_num(c.blocked_above_pause_probe_seconds)} s, and its RSS, "
            "read by the sidecar, is {{ $value | humanizePercentage }} of its memory limit, "
            "above the pause threshold. A blocked worker can neither pause nor spill: only the "
            "nanny's kill at the terminate threshold stops it.",
            c,
        ),
        _alert(
            "DaskWorkerGPUMemoryHigh",
            _expr(
                f"""
                (
                  {q.gpu_in_use} / {q.gpu_total}
                    > {_num(c.gpu_memory_high_ratio)}
                )
                or
                (
                  {q.gpu_in_use} / {q.gpu_limit}
                    > {_num(c.gpu_memory_high_limit_ratio)}
                )
                """
            ),
            c.gpu_memory_high_for,
            c.gpu_memory_high_severity,
            "GPU memory of Dask worker {{ $labels.worker_name }} is nearly full.",
            f"Device memory in use on the GPU of worker {_WORKER} has been at "
            "{{ $value | humanizePercentage }} of the device's total memory (or of dask-cuda's "
            f"device memory limit) for {c.gpu_memory_high_for}, above "
            f"{c.gpu_memory_high_ratio:.0%} of the total or {c.gpu_memory_high_limit_ratio:.0%} "
            "of the limit. In use means NVML's figure for the whole device less the free part "
            "of an RMM pool. The next large allocation may fail with a CUDA out-of-memory "
            "error.",
            c,
        ),
        _alert(
            "DaskWorkerGPUMemoryExhaustionPredicted",
            _expr(
                f"""
                (
                  predict_linear({q.gpu_used}[{c.gpu_exhaustion_window}], {_num(gpu_horizon)})
                    / {q.gpu_total}
                    > 1
                )
                and
                (
                  deriv({q.gpu_used}[{c.gpu_exhaustion_window}]) * {_num(gpu_horizon)}
                    / {q.gpu_total}
                    > {_num(c.gpu_exhaustion_min_ratio)}
                )
                and
                (
                  deriv({q.gpu_used}[{c.gpu_exhaustion_recent_window}])
                    > {_num(STILL_GROWING)} * deriv({q.gpu_used}[{c.gpu_exhaustion_window}])
                )
                """
            ),
            c.gpu_exhaustion_for,
            c.gpu_exhaustion_severity,
            f"GPU memory of Dask worker {{{{ $labels.worker_name }}}} is predicted to run out "
            f"within {c.gpu_exhaustion_horizon}.",
            f"Device memory used on the GPU of worker {_WORKER} has grown steadily over the "
            f"last {c.gpu_exhaustion_window} and is still growing; at this rate it reaches "
            f"{{{{ $value | humanizePercentage }}}} of the device's memory within "
            f"{c.gpu_exhaustion_horizon}: a CUDA out-of-memory error is coming.",
            c,
        ),
        _alert(
            "DaskWorkerHeartbeatStale",
            f"{q.heartbeat_age} > {_num(stale_after)}",
            c.heartbeat_stale_for,
            c.heartbeat_stale_severity,
            "Dask worker {{ $labels.worker_name }} has not sent a heartbeat for "
            "{{ $value | humanizeDuration }}.",
            f"The scheduler last heard from worker {_WORKER} "
            "{{ $value | humanizeDuration }} ago. Its event loop is probably blocked (a task "
            "holding the GIL): it neither spills nor pauses meanwhile, and its memory figures "
            "are stale.",
            c,
        ),
        _alert(
            "DaskMemoryExporterSchedulerDown",
            f"{q.scheduler_up} == 0",
            c.scheduler_down_for,
            c.scheduler_down_severity,
            "dask-memory-exporter {{ $labels.instance }} cannot reach its Dask scheduler.",
            "The exporter {{ $labels.instance }} (job {{ $labels.job }}) has failed to poll "
            f"its Dask scheduler for more than {c.scheduler_down_for}. The scheduler is down or "
            "unreachable; the worker memory metrics are frozen at the last good poll.",
            c,
        ),
        _alert(
            "DaskMemoryExporterDown",
            f"{q.up} == 0" + (f"\nor\nabsent({q.up})" if c.exporter_absent_alert else ""),
            c.exporter_down_for,
            c.exporter_down_severity,
            "A dask-memory-exporter target is down or missing.",
            'Job {{ $labels.job }}: Prometheus has not scraped the exporter target "'
            '{{ $labels.instance }}" successfully for more than '
            f"{c.exporter_down_for}, or the job has no target at all (empty instance). Dask "
            "worker memory is not monitored meanwhile: none of the other Dask memory alerts "
            "can fire.",
            c,
        ),
    ]
    return alerts


def add_runbook_links(rules: list[dict[str, Any]], base: str) -> list[dict[str, Any]]:
    """Copy of ``rules`` with ``runbook_url = base#alertname`` added where not set."""
    out = []
    for rule in rules:
        rule = dict(rule)
        if "alert" in rule:
            annotations = dict(rule.get("annotations", {}))
            annotations.setdefault("runbook_url", f"{base}#{rule['alert'].lower()}")
            rule["annotations"] = annotations
        out.append(rule)
    return out


def rule_groups(config: MixinConfig) -> dict[str, dict[str, Any]]:
    """{"alerts": group, "recording": group}: the two rule groups."""
    return {
        "alerts": {
            "name": ALERT_GROUP,
            "rules": add_runbook_links(alert_rules(config), config.runbook_url_base),
        },
        "recording": {"name": RECORDING_GROUP, "rules": recording_rules(config)},
    }


def prometheus_rule(config: MixinConfig) -> dict[str, Any]:
    """The monitoring.coreos.com/v1 PrometheusRule holding both groups."""
    groups = rule_groups(config)
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": config.prometheus_rule_name,
            "labels": _labels(config.prometheus_rule_labels, "prometheus_rule_labels"),
        },
        "spec": {"groups": [groups["recording"], groups["alerts"]]},
    }


_HEADER = (
    "# Generated by exporter/rules.py from MixinConfig: do not edit.\n"
    "# Regenerate with: dask-memory-exporter generate rules --output-dir deploy/prometheus\n"
)


def _dump(doc: dict[str, Any]) -> str:
    return _HEADER + yamlio.dump(doc)


def render_files(config: MixinConfig) -> dict[str, str]:
    """File name -> text of the rule files for ``deploy/prometheus/``."""
    groups = rule_groups(config)
    return {
        ALERTS_FILE: _dump({"groups": [groups["alerts"]]}),
        RECORDING_FILE: _dump({"groups": [groups["recording"]]}),
        PROMETHEUS_RULE_FILE: _dump(prometheus_rule(config)),
    }
