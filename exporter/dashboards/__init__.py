"""Grafana dashboards as code (grafana-foundation-sdk), rendered from a :class:`MixinConfig`.

Covers the two dashboards committed under ``grafana/dashboards/`` and their provisioning
examples under ``grafana/provisioning/``:

``dask-cluster-memory.json`` ("Dask cluster memory", :mod:`.cluster`)
    The Dask dashboard's memory picture in Grafana: managed (solid), unmanaged (lighter),
    unmanaged recent (lighter still) and spilled (grey) stacked, for the cluster and per worker;
    each worker's process memory against its limit with the target, spill, pause and terminate
    levels; a sortable worker table; the project's firing alerts; paused workers as annotations.
``dask-worker-memory.json`` ("Dask worker memory", :mod:`.worker`)
    One worker (template variable ``worker``, by ``worker_name``, which survives restarts) over
    time with its thresholds, process memory by source (the sidecar's direct RSS versus
    the scheduler's last heartbeat), paused state and heartbeat age.

One concern per module: :mod:`.queries` builds the PromQL, :mod:`.panels` the panels, variables
and annotations both dashboards share, :mod:`.render` the JSON files, :mod:`.provisioning` the
provider file and ConfigMap.

Pure and deterministic: metric names come from :mod:`dask_memory_exporter.names` (and
recorded series from :mod:`dask_memory_exporter.rules`), selectors, tags, refresh and time
range from the MixinConfig.
Thresholds are never constants here: they are drawn from the exporter's
``dask_memory_worker_threshold_ratio`` and ``dask_memory_worker_limit_bytes`` series.

Import and provisioning: every panel uses the data source variable ``datasource``. Its
current value is ``${DS_PROMETHEUS}``, the one entry of ``__inputs``, so importing through
Grafana's UI asks for a Prometheus data source and pre-selects it; a provisioned copy (file
provider or the Helm chart's sidecar) leaves it unresolved and Grafana falls back to the
default Prometheus data source. The cluster-label variables (``cluster_labels``: namespace,
job, instance and cluster by default) default to All (``.*``), which also matches series
without that label. Uids are derived from the file name, so links between the dashboards stay
stable.

What it does not cover: alert rules (``rules.py``), Kubernetes manifests (``deploy/``).
"""

from .cluster import cluster_dashboard
from .panels import CLUSTER_FILE, DATASOURCE_INPUT, WORKER_FILE, dashboard_uid
from .provisioning import CONFIGMAP_NAME, render_configmap, render_provider, render_provisioning
from .queries import ALERTNAME_REGEX
from .render import render_files
from .worker import worker_dashboard

__all__ = [
    "ALERTNAME_REGEX",
    "CLUSTER_FILE",
    "CONFIGMAP_NAME",
    "DATASOURCE_INPUT",
    "WORKER_FILE",
    "cluster_dashboard",
    "dashboard_uid",
    "render_configmap",
    "render_files",
    "render_provider",
    "render_provisioning",
    "worker_dashboard",
]
