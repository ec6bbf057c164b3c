"""Metric, label and label-value names: the exporter's public contract.

The collector, the alert rules and the dashboards all import these constants, so renaming a
metric breaks a unit test rather than a production alert. The namespace ``dask_memory_`` is
deliberately distinct from Dask's own ``dask_worker_*`` / ``dask_scheduler_*`` families, so
the exporter and Dask's built-in endpoints can be scraped by the same Prometheus.
"""

from __future__ import annotations

from typing import Final

# --- per-worker families (labels: worker, worker_name) -----------------------------------
WORKER_PROCESS_BYTES: Final = "dask_memory_worker_process_bytes"
"""Process memory (RSS) of the worker = managed + unmanaged + unmanaged_recent."""
WORKER_MANAGED_BYTES: Final = "dask_memory_worker_managed_bytes"
"""Managed memory in RAM: sizeof() of the Dask keys the worker holds in memory."""
WORKER_UNMANAGED_BYTES: Final = "dask_memory_worker_unmanaged_bytes"
"""Unmanaged (old) memory: the minimum of unmanaged memory over recent-to-old-time."""
WORKER_UNMANAGED_RECENT_BYTES: Final = "dask_memory_worker_unmanaged_recent_bytes"
"""Unmanaged memory that appeared within the last recent-to-old-time (30 s by default)."""
WORKER_SPILLED_BYTES: Final = "dask_memory_worker_spilled_bytes"
"""Managed data spilled to disk (size on disk; not part of process memory)."""
WORKER_LIMIT_BYTES: Final = "dask_memory_worker_limit_bytes"
"""The worker's memory_limit. Absent for a worker without a limit."""
WORKER_THRESHOLD_RATIO: Final = "dask_memory_worker_threshold_ratio"
"""Memory-manager thresholds as fractions of the limit (label ``threshold``)."""
WORKER_PAUSED: Final = "dask_memory_worker_paused"
"""1 while the worker's status is paused, else 0."""
WORKER_HEARTBEAT_AGE_SECONDS: Final = "dask_memory_worker_heartbeat_age_seconds"
"""Seconds since the scheduler last heard a heartbeat from the worker."""
WORKER_RSS_BYTES: Final = "dask_memory_worker_rss_bytes"
"""RSS read directly from the operating system by a sidecar (local mode only)."""
WORKER_HEARTBEAT_PROCESS_BYTES: Final = "dask_memory_worker_heartbeat_process_bytes"
"""The heartbeat's own process-memory figure, exported only where process memory is the
direct RSS (sidecar modes): the two differ while the worker's event loop is blocked."""

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

# --- exporter self-metrics -------------------------------------------------------------
SCHEDULER_UP: Final = "dask_memory_scheduler_up"
"""1 if the last poll of the scheduler succeeded, else 0."""
SCHEDULER_WORKERS: Final = "dask_memory_scheduler_workers"
"""Number of workers the scheduler reported in the last successful poll."""
EXPORTER_POLL_DURATION_SECONDS: Final = "dask_memory_exporter_poll_duration_seconds"
"""Wall time of the last poll (fetch, decode, model update)."""
EXPORTER_LAST_SUCCESS_TIMESTAMP_SECONDS: Final = (
    "dask_memory_exporter_last_poll_success_timestamp_seconds"
)
"""Unix time of the last successful poll of the scheduler."""
EXPORTER_POLLS_TOTAL: Final = "dask_memory_exporter_polls_total"
"""Poll attempts since the exporter started (counter; exposed with ``_total``)."""
EXPORTER_POLL_ERRORS_TOTAL: Final = "dask_memory_exporter_poll_errors_total"
"""Failed polls since the exporter started (counter)."""
EXPORTER_SKIPPED_WORKERS: Final = "dask_memory_exporter_skipped_workers"
"""Worker entries skipped in the last poll because they were missing or malformed fields."""
EXPORTER_SOURCE_SUCCESS: Final = "dask_memory_exporter_source_success"
"""Per-source success (label ``source``) of the last poll, node_exporter style."""
EXPORTER_SOURCE_DURATION_SECONDS: Final = "dask_memory_exporter_source_duration_seconds"
"""Per-source duration (label ``source``) of the last poll."""
EXPORTER_BUILD_INFO: Final = "dask_memory_exporter_build_info"
"""Constant 1 with labels ``version`` and ``distributed_version``."""

# --- labels -----------------------------------------------------------------------------
LABEL_WORKER: Final = "worker"
"""The worker's address, e.g. tcp://10.0.0.5:40123 (unique, changes when a worker restarts)."""
LABEL_WORKER_NAME: Final = "worker_name"
"""The worker's name as given to Dask (stable across restarts in dask-kubernetes)."""
LABEL_THRESHOLD: Final = "threshold"
LABEL_SOURCE: Final = "source"
WORKER_LABELS: Final = (LABEL_WORKER, LABEL_WORKER_NAME)

# --- label values -------------------------------------------------------------------------
THRESHOLD_TARGET: Final = "target"
THRESHOLD_SPILL: Final = "spill"
THRESHOLD_PAUSE: Final = "pause"
THRESHOLD_TERMINATE: Final = "terminate"
THRESHOLDS: Final = (THRESHOLD_TARGET, THRESHOLD_SPILL, THRESHOLD_PAUSE, THRESHOLD_TERMINATE)

SOURCE_SCHEDULER: Final = "scheduler"
SOURCE_LOCAL: Final = "local"
