"""PromQL for the dashboards: selectors built from a MixinConfig and the template variables."""

from __future__ import annotations

from .. import names as n
from ..mixin import MixinConfig
from ..rules import (
    CLUSTER_PAUSED_WORKERS,
    CLUSTER_WORKERS,
    WORKER_PROCESS_LIMIT_RATIO,
    WORKER_THRESHOLD_BYTES,
    cluster_sum,
)

ALERTNAME_REGEX = "Dask.*"
"""Every alert of exporter/rules.py is named Dask...; the alerts panels select them by this."""
FIRING = 'alertstate="firing"'

DS_VAR = "datasource"
WORKER_VAR = "worker"
GPU_VAR = "gpu"


class Queries:
    """Selectors for one MixinConfig: exporter selector + cluster-label (+ worker) variables."""

    def __init__(self, config: MixinConfig) -> None:
        self.c = config
        clash = {DS_VAR, WORKER_VAR, GPU_VAR} & set(config.cluster_labels)
        if clash:
            raise ValueError(f"cluster_labels may not use the variable names {sorted(clash)}")
        self.cluster_matchers = [f'{label}=~"${label}"' for label in config.cluster_labels]
        self.worker_matcher = f'{n.LABEL_WORKER_NAME}=~"${WORKER_VAR}"'

    def cluster(self, *extra: str) -> str:
        """``{exporter selector, cluster-label variables, extra}``."""
        return self.c.selector(*self.cluster_matchers, *extra)

    def worker(self, *extra: str) -> str:
        """As :meth:`cluster`, restricted to the ``worker`` variable."""
        return self.cluster(self.worker_matcher, *extra)

    @property
    def by_worker(self) -> str:
        """Grouping that keeps one row per worker (and cluster) in table queries."""
        return ", ".join((*self.c.cluster_labels, n.LABEL_WORKER, n.LABEL_WORKER_NAME))

    def threshold_ratio(self, sel: str) -> str:
        return n.WORKER_THRESHOLD_RATIO + sel

    @property
    def recorded(self) -> str:
        """Selector for the per-cluster recorded series. They keep only the cluster labels, so
        the exporter selector (which may match on other labels) is already applied by the rule.
        """
        return "{" + ", ".join(self.cluster_matchers) + "}"

    @property
    def recorded_worker(self) -> str:
        """Selector for the per-worker recorded series, restricted to the ``worker`` variable
        (the rule applied the exporter selector, as for :attr:`recorded`)."""
        return "{" + ", ".join((*self.cluster_matchers, self.worker_matcher)) + "}"

    def cluster_total(self, metric: str) -> str:
        """Total of a per-worker family over the selected clusters."""
        if self.c.dashboard_recording_rules:
            return f"sum({cluster_sum(metric)}{self.recorded})"
        return f"sum({metric}{self.cluster()})"

    def workers(self) -> str:
        """Number of workers in the selected clusters."""
        if self.c.dashboard_recording_rules:
            return f"sum({CLUSTER_WORKERS}{self.recorded})"
        return f"count({n.WORKER_PROCESS_BYTES}{self.cluster()})"

    def paused_workers(self) -> str:
        """Number of paused workers in the selected clusters."""
        if self.c.dashboard_recording_rules:
            return f"sum({CLUSTER_PAUSED_WORKERS}{self.recorded})"
        return f"sum({n.WORKER_PAUSED}{self.cluster()})"

    def process_of_limit(self) -> str:
        """Process memory / limit of each selected worker, over time (workers with a limit)."""
        if self.c.dashboard_recording_rules:
            return WORKER_PROCESS_LIMIT_RATIO + self.recorded_worker
        ws = self.worker()
        return f"{n.WORKER_PROCESS_BYTES}{ws} / {n.WORKER_LIMIT_BYTES}{ws}"

    def threshold_bytes(self) -> str:
        """Each threshold in bytes of each selected worker (limit x ratio), label ``threshold``
        kept."""
        if self.c.dashboard_recording_rules:
            return WORKER_THRESHOLD_BYTES + self.recorded_worker
        ws = self.worker()
        return (
            f"{n.WORKER_LIMIT_BYTES}{ws} * ignoring({n.LABEL_THRESHOLD}) group_right "
            f"{n.WORKER_THRESHOLD_RATIO}{ws}"
        )

    def alerts(self, *extra: str) -> str:
        return "ALERTS" + self.cluster(f'alertname=~"{ALERTNAME_REGEX}"', *extra)
