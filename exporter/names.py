"""Metric declarations: name, type, HELP, unit and labels of every family, declared once.

The collector, the landing page, the alert rules and the dashboards all read these
declarations, so renaming a metric breaks a unit test rather than a production alert. A
:class:`Metric` is the metric's name (a ``str``, so PromQL is written with it directly) that
also carries the rest of its declaration. The namespace ``dask_memory_`` is deliberately
distinct from Dask's own ``dask_worker_*`` / ``dask_scheduler_*`` families, so the exporter
and Dask's built-in endpoints can be scraped by the same Prometheus.

Per-worker families that a source plug-in owns (heartbeat figures, for instance) are declared
in that source's module with the same :class:`Metric`; :data:`CORE_WORKER_FAMILIES` lists the
memory breakdown's own.
"""

from __future__ import annotations

from typing import Final, Literal

Kind = Literal["gauge", "counter", "info"]

# --- labels -----------------------------------------------------------------------------
LABEL_WORKER: Final = "worker"
"""The worker's address, e.g. tcp://10.0.0.5:40123 (unique, changes when a worker restarts)."""
LABEL_WORKER_NAME: Final = "worker_name"
"""The worker's name as given to Dask (stable across restarts in dask-kubernetes)."""
LABEL_CLUSTER: Final = "cluster"
"""Gateway mode only: the dask-gateway cluster's name, put first on every series of that
cluster (a target label ``cluster`` set by Prometheus would rename it ``exported_cluster``)."""
LABEL_THRESHOLD: Final = "threshold"
LABEL_SOURCE: Final = "source"
LABEL_REASON: Final = "reason"
"""Why a source's fetch failed: a bounded set per source (refused, dns, timeout, tls …)."""
WORKER_LABELS: Final = (LABEL_WORKER, LABEL_WORKER_NAME)

_UNITS = ("bytes", "seconds", "ratio", "")
_DECLARED: dict[str, Metric] = {}


def declared() -> tuple[Metric, ...]:
    """Every metric declared so far: these and those of the source modules imported (the
    app imports them all)."""
    return tuple(_DECLARED.values())


class Metric(str):
    """A metric family's name that carries its declaration.

    ``name`` is what Prometheus stores (counters end in ``_total``, info metrics in
    ``_info``); ``unit`` is a base unit that the name must end with (before ``_total``).
    Declaring a metric checks those conventions at import time, so a badly named family
    cannot be added.
    """

    kind: Kind
    help: str
    unit: str
    labels: tuple[str, ...]

    def __new__(
        cls,
        name: str,
        kind: Kind,
        help: str,
        *,
        unit: str = "",
        labels: tuple[str, ...] = (),
    ) -> Metric:
        self = super().__new__(cls, name)
        self.kind, self.help, self.unit, self.labels = kind, help, unit, labels
        stem = name.removesuffix("_total") if kind == "counter" else name
        if kind == "counter" and not name.endswith("_total"):
            raise ValueError(f"counter {name} must end in _total")
        if kind == "info" and not name.endswith("_info"):
            raise ValueError(f"info metric {name} must end in _info")
        if unit not in _UNITS or (unit and not stem.endswith("_" + unit)):
            raise ValueError(f"{name}: unit {unit!r} must be a base unit that ends the name")
        if _DECLARED.setdefault(name, self) is not self:
            raise ValueError(f"{name} is declared twice")
        return self

    @property
    def name(self) -> str:
        return str(self)

    @property
    def heading(self) -> str:
        """A heading for tables and panels: the name without namespace and unit."""
        text = self.removeprefix("dask_memory_worker_").removeprefix("dask_memory_")
        text = text.removesuffix("_" + self.unit) if self.unit else text
        text = text.replace("_", " ")
        return text[:1].upper() + text[1:]

    @property
    def family(self) -> str:
        """The family name prometheus_client expects (without ``_total`` / ``_info``)."""
        if self.kind == "counter":
            return self.removesuffix("_total")
        if self.kind == "info":
            return self.removesuffix("_info")
        return str(self)


def worker_gauge(name: str, help: str, *, unit: str = "", threshold: bool = False) -> Metric:
    """A per-worker gauge, labelled ``worker`` and ``worker_name`` (and ``threshold``)."""
    labels = (*WORKER_LABELS, LABEL_THRESHOLD) if threshold else WORKER_LABELS
    return Metric(name, "gauge", help, unit=unit, labels=labels)


# --- per-worker families (labels: worker, worker_name) -----------------------------------
WORKER_PROCESS_BYTES: Final = worker_gauge(
    "dask_memory_worker_process_bytes",
    "Worker process memory (RSS) in bytes: managed + unmanaged + unmanaged recent.",
    unit="bytes",
)
WORKER_MANAGED_BYTES: Final = worker_gauge(
    "dask_memory_worker_managed_bytes",
    "Managed memory in RAM (sizeof of the Dask keys the worker holds in memory) in bytes.",
    unit="bytes",
)
WORKER_UNMANAGED_BYTES: Final = worker_gauge(
    "dask_memory_worker_unmanaged_bytes",
    "Unmanaged (old) memory in bytes: the minimum over recent-to-old-time.",
    unit="bytes",
)
WORKER_UNMANAGED_RECENT_BYTES: Final = worker_gauge(
    "dask_memory_worker_unmanaged_recent_bytes",
    "Unmanaged memory that appeared within recent-to-old-time, in bytes.",
    unit="bytes",
)
WORKER_SPILLED_BYTES: Final = worker_gauge(
    "dask_memory_worker_spilled_bytes",
    "Managed data spilled to disk, in bytes on disk (not part of process memory).",
    unit="bytes",
)
WORKER_LIMIT_BYTES: Final = worker_gauge(
    "dask_memory_worker_limit_bytes",
    "Worker memory_limit in bytes (absent for a worker without a limit).",
    unit="bytes",
)
WORKER_THRESHOLD_RATIO: Final = worker_gauge(
    "dask_memory_worker_threshold_ratio",
    "Memory-manager thresholds as a fraction of memory_limit.",
    unit="ratio",
    threshold=True,
)
WORKER_PAUSED: Final = worker_gauge(
    "dask_memory_worker_paused", "1 if the worker is paused, else 0."
)
WORKER_HEARTBEAT_AGE_SECONDS: Final = worker_gauge(
    "dask_memory_worker_heartbeat_age_seconds",
    "Seconds since the scheduler last received a heartbeat from the worker.",
    unit="seconds",
)
WORKER_RSS_BYTES: Final = worker_gauge(
    "dask_memory_worker_rss_bytes",
    "Worker RSS in bytes, read directly from the OS by a sidecar (local and both modes).",
    unit="bytes",
)
WORKER_HEARTBEAT_PROCESS_BYTES: Final = worker_gauge(
    "dask_memory_worker_heartbeat_process_bytes",
    "The heartbeat's process memory in bytes, where process memory is the direct RSS "
    "(sidecar modes): the two part while the worker's event loop is blocked.",
    unit="bytes",
)
WORKER_EVENT_LOOP_PROBE_SECONDS: Final = worker_gauge(
    "dask_memory_worker_event_loop_probe_seconds",
    "Seconds the worker's event loop took to answer the sidecar's probe of its own HTTP "
    "endpoint, or, while unanswered, has kept it waiting so far: climbs while the loop is "
    "blocked (mode local with --worker-probe-url).",
    unit="seconds",
)

WORKER_FAMILIES: Final = (
    WORKER_PROCESS_BYTES,
    WORKER_MANAGED_BYTES,
    WORKER_UNMANAGED_BYTES,
    WORKER_UNMANAGED_RECENT_BYTES,
    WORKER_SPILLED_BYTES,
    WORKER_LIMIT_BYTES,
    WORKER_THRESHOLD_RATIO,
    WORKER_PAUSED,
    WORKER_HEARTBEAT_AGE_SECONDS,
)
"""The families of every worker the scheduler reports (its heartbeat's memory breakdown)."""
SIDECAR_WORKER_FAMILIES: Final = (WORKER_RSS_BYTES, WORKER_HEARTBEAT_PROCESS_BYTES)
"""The families of workers whose RSS a sidecar reads from the OS (modes local and both)."""
CORE_WORKER_FAMILIES: Final = (*WORKER_FAMILIES, *SIDECAR_WORKER_FAMILIES)
"""The memory breakdown's per-worker families, in exposition order."""


# --- cluster totals (--cluster-totals-only: instead of the per-worker families) ------------
def cluster_gauge(name: str, help: str, *, unit: str = "") -> Metric:
    """An unlabelled cluster total, exported instead of the per-worker families."""
    return Metric(name, "gauge", help, unit=unit)


CLUSTER_PROCESS_BYTES: Final = cluster_gauge(
    "dask_memory_cluster_process_bytes",
    "Process memory of all workers in bytes (sum of dask_memory_worker_process_bytes).",
    unit="bytes",
)
CLUSTER_MANAGED_BYTES: Final = cluster_gauge(
    "dask_memory_cluster_managed_bytes",
    "Managed memory in RAM of all workers in bytes.",
    unit="bytes",
)
CLUSTER_UNMANAGED_BYTES: Final = cluster_gauge(
    "dask_memory_cluster_unmanaged_bytes",
    "Unmanaged (old) memory of all workers in bytes.",
    unit="bytes",
)
CLUSTER_UNMANAGED_RECENT_BYTES: Final = cluster_gauge(
    "dask_memory_cluster_unmanaged_recent_bytes",
    "Unmanaged recent memory of all workers in bytes.",
    unit="bytes",
)
CLUSTER_SPILLED_BYTES: Final = cluster_gauge(
    "dask_memory_cluster_spilled_bytes",
    "Managed data spilled to disk by all workers, in bytes on disk.",
    unit="bytes",
)
CLUSTER_LIMIT_BYTES: Final = cluster_gauge(
    "dask_memory_cluster_limit_bytes",
    "Sum of the memory limits of the workers that have one, in bytes.",
    unit="bytes",
)
CLUSTER_PAUSED_WORKERS: Final = cluster_gauge(
    "dask_memory_cluster_paused_workers", "Workers paused at their last heartbeat."
)
CLUSTER_MAX_PROCESS_LIMIT_RATIO: Final = cluster_gauge(
    "dask_memory_cluster_max_process_limit_ratio",
    "The highest process memory / memory limit of any worker with a limit.",
    unit="ratio",
)
CLUSTER_MAX_HEARTBEAT_AGE_SECONDS: Final = cluster_gauge(
    "dask_memory_cluster_max_heartbeat_age_seconds",
    "The oldest heartbeat of any worker, in seconds: climbs while some worker is blocked.",
    unit="seconds",
)
CLUSTER_FAMILIES: Final = (
    CLUSTER_PROCESS_BYTES,
    CLUSTER_MANAGED_BYTES,
    CLUSTER_UNMANAGED_BYTES,
    CLUSTER_UNMANAGED_RECENT_BYTES,
    CLUSTER_SPILLED_BYTES,
    CLUSTER_LIMIT_BYTES,
    CLUSTER_PAUSED_WORKERS,
    CLUSTER_MAX_PROCESS_LIMIT_RATIO,
    CLUSTER_MAX_HEARTBEAT_AGE_SECONDS,
)
"""What --cluster-totals-only exports in place of every per-worker family."""

# --- exporter self-metrics -------------------------------------------------------------
SCHEDULER_UP: Final = Metric(
    "dask_memory_scheduler_up", "gauge", "1 if the last completed poll of the scheduler "
    "succeeded, else 0 (absent without a scheduler)."
)  # fmt: skip
SCHEDULER_WORKERS: Final = Metric(
    "dask_memory_scheduler_workers", "gauge",
    "Workers the scheduler reported in the last successful poll.",
)  # fmt: skip
EXPORTER_POLL_DURATION_SECONDS: Final = Metric(
    "dask_memory_exporter_poll_duration_seconds", "gauge",
    "Duration of the last poll in seconds.", unit="seconds",
)  # fmt: skip
EXPORTER_LAST_SUCCESS_TIMESTAMP_SECONDS: Final = Metric(
    "dask_memory_exporter_last_poll_success_timestamp_seconds", "gauge",
    "Unix time of the last successful poll of the scheduler.", unit="seconds",
)  # fmt: skip
EXPORTER_POLLS_TOTAL: Final = Metric(
    "dask_memory_exporter_polls_total", "counter", "Polls attempted since the exporter started."
)
EXPORTER_SKIPPED_WORKERS: Final = Metric(
    "dask_memory_exporter_skipped_workers", "gauge",
    "Worker entries skipped in the last poll (missing or malformed fields).",
)  # fmt: skip
EXPORTER_SOURCE_SUCCESS: Final = Metric(
    "dask_memory_exporter_source_success", "gauge",
    "1 if the source's last completed fetch succeeded, else 0.", labels=(LABEL_SOURCE,),
)  # fmt: skip
EXPORTER_SOURCE_DURATION_SECONDS: Final = Metric(
    "dask_memory_exporter_source_duration_seconds", "gauge",
    "Duration of the source's last completed fetch, in seconds.",
    unit="seconds", labels=(LABEL_SOURCE,),
)  # fmt: skip
EXPORTER_SOURCE_ERRORS_TOTAL: Final = Metric(
    "dask_memory_exporter_source_errors_total", "counter",
    "Failed fetches of the source since the exporter started, by cause.",
    labels=(LABEL_SOURCE, LABEL_REASON),
)  # fmt: skip
EXPORTER_LOCAL_UNREADABLE_PROCESSES: Final = Metric(
    "dask_memory_exporter_local_unreadable_processes", "gauge",
    "Worker processes beside the exporter whose RSS could not be read (permission denied).",
)  # fmt: skip
EXPORTER_BUILD_INFO: Final = Metric(
    "dask_memory_exporter_build_info", "info", "Version of the exporter and of distributed."
)

# --- label values -------------------------------------------------------------------------
THRESHOLD_TARGET: Final = "target"
THRESHOLD_SPILL: Final = "spill"
THRESHOLD_PAUSE: Final = "pause"
THRESHOLD_TERMINATE: Final = "terminate"
THRESHOLDS: Final = (THRESHOLD_TARGET, THRESHOLD_SPILL, THRESHOLD_PAUSE, THRESHOLD_TERMINATE)

SOURCE_SCHEDULER: Final = "scheduler"
SOURCE_LOCAL: Final = "local"
