"""The monitoring mixin's one configuration, shared by the rule and dashboard generators.

Like kubernetes-mixin's ``_config``: every selector, window, ``for:`` duration, severity and
grouping label lives here with a comment, and ``rules.py`` / ``dashboards/`` interpolate it
instead of hard-coding ``job="..."``. Pure data: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MixinConfig:
    """Settings for generated alerts, recording rules and dashboards."""

    exporter_selector: str = 'job="dask-memory-exporter"'
    """PromQL label matchers selecting the exporter's series (no braces)."""

    cluster_labels: tuple[str, ...] = ("namespace", "job", "instance", "cluster")
    """Labels that together identify one Dask cluster: the exporter target's, plus ``cluster``,
    which the gateway mode puts on every series (one target, many clusters). A series without
    a label has it empty, so the same rules serve both kinds of exporter."""

    worker_join_labels: tuple[str, ...] = ("namespace", "job")
    """Target labels that, with ``worker_name``, identify one worker across a cluster's
    exporters: the scheduler-mode exporter's breakdown and each worker sidecar's direct RSS
    and event-loop probe (cluster_labels without the target's own ``instance``)."""

    runbook_url_base: str = "http://{{ $labels.instance }}/runbooks"
    """Runbook links are ``{runbook_url_base}#{alertname lower-cased}``. By default the
    runbooks the exporter that raised the alert serves at /runbooks (docs/runbooks.md, of the
    version running there), at the address Prometheus scrapes; set your own copy (an internal
    wiki, your fork's docs/runbooks.md) where alert readers cannot reach the targets, or where
    they are scraped over https."""

    dashboard_refresh: str = "30s"
    """Refresh interval of the generated dashboards."""

    dashboard_tags: tuple[str, ...] = ("dask", "dask-memory-exporter")
    """Tags applied to every generated dashboard."""

    dashboard_time_from: str = "now-1h"
    """Default time range of the generated dashboards (``from``; ``to`` is now)."""

    dashboard_recording_rules: bool = True
    """Cluster totals over time read the recording rules (``dask_cluster:...:sum``, loaded from
    deploy/prometheus/); set False for a Prometheus without them (raw sums, heavier)."""

    # --- alerts and recording rules (rules.py) ------------------------------------------
    # Memory thresholds are not settings: every rule reads them from the exporter's
    # dask_memory_worker_threshold_ratio and dask_memory_worker_limit_bytes series, so each
    # cluster is judged by its own Dask configuration. Durations use Prometheus syntax.

    alert_extra_labels: tuple[str, ...] = ()
    """Extra ``key=value`` labels put on every alert (e.g. ``team=data``)."""

    blocked_above_pause_probe_seconds: float = 5.0
    """DaskWorkerBlockedAbovePause: the sidecar's event-loop probe has waited this long."""
    blocked_above_pause_for: str = "30s"
    blocked_above_pause_severity: str = "critical"

    no_data_to_spill_for: str = "1m"
    """``for:`` of DaskWorkerMemoryHighNoDataToSpill (filters short task-heap peaks)."""
    no_data_to_spill_severity: str = "warning"

    pause_predicted_window: str = "10m"
    """Window over which the growth rate of unmanaged (old) memory is estimated."""
    pause_predicted_recent_window: str = "2m"
    """Unmanaged (old) memory must still grow over this recent window, at no less than half
    the rate over pause_predicted_window: a one-off step is not a trend. Keep it shorter than
    pause_predicted_for."""
    pause_predicted_horizon: str = "30m"
    """DaskWorkerPausePredicted fires when the pause threshold is reached within this time."""
    pause_predicted_for: str = "5m"
    pause_predicted_severity: str = "warning"

    paused_for: str = "1m"
    paused_severity: str = "warning"

    near_termination_margin: float = 0.05
    """DaskWorkerNearTermination fires above (terminate threshold - margin) x limit."""
    near_termination_for: str = "15s"
    near_termination_severity: str = "critical"

    unmanaged_growing_window: str = "1h"
    """Long window over which steady growth of unmanaged (old) memory is judged."""
    unmanaged_growing_recent_window: str = "10m"
    """Unmanaged (old) memory must still grow over this recent window, at no less than half
    the long-window rate (a one-off step is not a leak). Keep it shorter than the ``for:``."""
    unmanaged_growing_horizon: str = "4h"
    """Fires when, at the long-window rate, unmanaged (old) passes the target within this."""
    unmanaged_growing_min_ratio: float = 0.05
    """... and grows by at least this fraction of the limit within the horizon (ignores creep)."""
    unmanaged_growing_for: str = "15m"
    unmanaged_growing_severity: str = "info"

    killed_for_memory_window: str = "10m"
    """DaskWorkerKilledForMemory fires while a memory restart lies within this window."""
    killed_for_memory_severity: str = "warning"

    lost_unexpectedly_window: str = "10m"
    """DaskWorkerLostUnexpectedly fires while an unexpected departure (other than a memory
    restart, which DaskWorkerKilledForMemory reports) lies within this window."""
    lost_unexpectedly_severity: str = "warning"
    gpu_memory_high_ratio: float = 0.9
    """DaskWorkerGPUMemoryHigh fires above this share of the device's total memory ..."""
    gpu_memory_high_limit_ratio: float = 1.0
    """... or above this share of dask-cuda's device_memory_limit, where the preload reports
    it (1.0: above the limit, which DeviceHostFile spills at, so spilling is not keeping up).
    Device memory is NVML's used figure less the free part of an RMM pool."""
    gpu_memory_high_for: str = "5m"
    gpu_memory_high_severity: str = "warning"

    gpu_exhaustion_window: str = "30m"
    """Window over which the growth of device memory (NVML's used figure) is estimated."""
    gpu_exhaustion_recent_window: str = "5m"
    """Device memory must still grow over this recent window, at no less than half the rate over
    gpu_exhaustion_window: the step of an RMM pool being reserved is not a trend."""
    gpu_exhaustion_horizon: str = "1h"
    """DaskWorkerGPUMemoryExhaustionPredicted fires when the device fills within this time ..."""
    gpu_exhaustion_min_ratio: float = 0.05
    """... and device memory grows by at least this share of the device within the horizon."""
    gpu_exhaustion_for: str = "10m"
    gpu_exhaustion_severity: str = "warning"

    heartbeat_stale_after: str = "1m"
    """DaskWorkerHeartbeatStale fires when a worker's last heartbeat is older than this."""
    heartbeat_stale_for: str = "1m"
    heartbeat_stale_severity: str = "warning"

    scheduler_down_for: str = "2m"
    scheduler_down_severity: str = "critical"

    exporter_down_for: str = "5m"
    exporter_down_severity: str = "warning"
    exporter_absent_alert: bool = True
    """Also alert when no exporter target exists at all (turn off for ephemeral clusters)."""

    prometheus_rule_name: str = "dask-memory-exporter"
    """metadata.name of the generated PrometheusRule."""
    prometheus_rule_labels: tuple[str, ...] = ("app.kubernetes.io/name=dask-memory-exporter",)
    """``key=value`` metadata labels of the PrometheusRule (match your ruleSelector)."""

    def selector(self, *extra: str) -> str:
        """Braced PromQL selector: the exporter selector plus extra matchers."""
        parts = [p for p in (self.exporter_selector, *extra) if p]
        return "{" + ", ".join(parts) + "}"

    @property
    def worker_by(self) -> str:
        """Grouping labels joining one worker's series across exporters, ``worker_name`` last."""
        return ", ".join((*self.worker_join_labels, "worker_name"))

    @property
    def cluster_by(self) -> str:
        """Comma-separated grouping labels for ``by (...)`` clauses."""
        return ", ".join(self.cluster_labels)
