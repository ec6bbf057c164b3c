"""SnapshotCollector: Prometheus metric families built fresh from one Snapshot.

A custom prometheus_client collector, never labelled global gauges: each collect() emits only
the workers of the current Snapshot, so a worker that leaves is gone from the next scrape
after the next poll. The Snapshot changes once per poll, so ``Exposition`` renders the
families once per poll (both text formats, and gzip) and the HTTP layer serves cached bytes.
collect() never awaits and never does I/O.
"""

from __future__ import annotations

import gzip
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
)
from prometheus_client.core import Metric as PromMetric
from prometheus_client.exposition import generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.registry import Collector

from . import names as n
from .names import Metric
from .snapshot import Snapshot, WorkerSnapshot
from .source import LocalOnlyProcess

__all__ = [
    "CORE_GAUGES",
    "Exposition",
    "SnapshotCollector",
    "cluster_totals",
    "package_version",
    "worker_gauges",
    "write_worker_families",
]

OPENMETRICS_CONTENT_TYPE = "application/openmetrics-text; version=1.0.0; charset=utf-8"
TEXT_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def package_version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


_VERSION_LABELS = {
    "version": package_version("dask-memory-exporter"),
    "distributed_version": package_version("distributed"),
}


@dataclass(frozen=True, slots=True)
class WorkerGauge:
    """One per-worker gauge family: its declaration and how to read it from a worker.

    ``value`` returns None where the worker has no such figure (no limit, no direct RSS): the
    series is omitted rather than exported as 0 or NaN. A family declared with the
    ``threshold`` label carries one series per memory-manager threshold, its value multiplied
    by each threshold's ratio.
    """

    metric: Metric
    value: Callable[[WorkerSnapshot, Snapshot], float | None]
    local_only: Callable[[LocalOnlyProcess], float | None] | None = None
    """The value for a process the scheduler has not reported, for the few families that
    have one (direct RSS)."""

    @property
    def per_threshold(self) -> bool:
        return n.LABEL_THRESHOLD in self.metric.labels


def _limited(w: WorkerSnapshot, v: float) -> float | None:
    return v if w.info.memory_limit else None


CORE_GAUGES: tuple[WorkerGauge, ...] = (
    WorkerGauge(n.WORKER_PROCESS_BYTES, lambda w, s: w.memory.process),
    WorkerGauge(n.WORKER_MANAGED_BYTES, lambda w, s: w.memory.managed),
    WorkerGauge(n.WORKER_UNMANAGED_BYTES, lambda w, s: w.memory.unmanaged_old),
    WorkerGauge(n.WORKER_UNMANAGED_RECENT_BYTES, lambda w, s: w.memory.unmanaged_recent),
    WorkerGauge(n.WORKER_SPILLED_BYTES, lambda w, s: w.memory.spilled),
    WorkerGauge(n.WORKER_LIMIT_BYTES, lambda w, s: w.info.memory_limit),
    WorkerGauge(n.WORKER_THRESHOLD_RATIO, lambda w, s: _limited(w, 1.0)),
    WorkerGauge(n.WORKER_PAUSED, lambda w, s: 1.0 if w.info.status == "paused" else 0.0),
    WorkerGauge(n.WORKER_HEARTBEAT_AGE_SECONDS, lambda w, s: max(0.0, s.time - w.info.last_seen)),
    WorkerGauge(n.WORKER_RSS_BYTES, lambda w, s: w.rss, local_only=lambda p: p.rss),
    WorkerGauge(
        n.WORKER_HEARTBEAT_PROCESS_BYTES,
        lambda w, s: w.info.reading.process if w.rss is not None else None,
    ),
)
"""The memory breakdown's families (``names.CORE_WORKER_FAMILIES``), in exposition order."""


def _plugin_gauge(metric: Metric) -> WorkerGauge:
    return WorkerGauge(
        metric, lambda w, s: w.values.get(metric), local_only=lambda p: p.values.get(metric)
    )


def worker_gauges(snapshot: Snapshot) -> tuple[WorkerGauge, ...]:
    """Every per-worker family of a Snapshot: the core ones, then the sources' own (in gateway
    mode, those of every cluster)."""
    return _all_gauges(cluster_parts(snapshot))


class SnapshotCollector(Collector):
    """Renders one Snapshot. Construct a new one per Snapshot; collect() is pure.

    The reference rendering through prometheus_client; ``Exposition`` writes the per-worker
    families directly from the same ``worker_gauges`` table (10x to 17x faster at 1,000
    workers), and a unit test checks that both parse to the same samples.
    """

    def __init__(self, snapshot: Snapshot, *, workers: bool = True, totals: bool = False) -> None:
        """``workers``: the per-worker families; ``totals``: the cluster totals instead."""
        self.snapshot = snapshot
        self.workers = workers
        self.totals = totals

    def describe(self) -> list[PromMetric]:
        # Registering must not trigger a collect (prometheus_client calls describe()).
        return []

    def collect(self) -> Iterator[PromMetric]:
        if self.totals:
            yield from self._total_families()
        elif self.workers:
            yield from self._worker_families()
        yield from self._self_families()

    def _total_families(self) -> Iterator[PromMetric]:
        """The cluster totals; in gateway mode one sample per cluster, labelled ``cluster``."""
        values: dict[Metric, list[tuple[dict[str, str], float]]] = {}
        for name, part in cluster_parts(self.snapshot):
            labels = {n.LABEL_CLUSTER: name} if name else {}
            for metric, value in cluster_totals(part).items():
                values.setdefault(metric, []).append((labels, value))
        for metric in n.CLUSTER_FAMILIES:
            if metric in values:
                yield _family(metric, values[metric])

    def _worker_families(self) -> Iterator[PromMetric]:
        parts = cluster_parts(self.snapshot)
        cl = [n.LABEL_CLUSTER] if self.snapshot.clusters else []
        for g in _all_gauges(parts):
            fam = GaugeMetricFamily(g.metric, g.metric.help, labels=[*cl, *g.metric.labels])
            for prefix, snap in parts:
                thresholds = list(snap.thresholds.items())
                pre = [prefix] if cl else []
                for w in snap.workers:
                    v = g.value(w, snap)
                    if v is None:
                        continue
                    lv = [*pre, w.info.address, w.info.name]
                    if g.per_threshold:
                        for key, ratio in thresholds:
                            fam.add_metric([*lv, key], v * ratio)
                    else:
                        fam.add_metric(lv, v)
                if g.local_only is not None:
                    for p in snap.local_only:
                        lv_v = g.local_only(p)
                        if lv_v is not None:
                            fam.add_metric([*pre, "", p.name], lv_v)
            if fam.samples:
                yield fam

    def _self_families(self) -> Iterator[PromMetric]:
        """The exporter's own families; in gateway mode the gateway's (no ``cluster`` label)
        followed by each cluster's (labelled ``cluster``)."""
        top = self.snapshot
        parts: list[tuple[dict[str, str], Snapshot]] = [({}, top)]
        parts += [({n.LABEL_CLUSTER: name}, s) for name, s in top.clusters.items()]
        scheduled = [(lv, s) for lv, s in parts if s.has_scheduler]
        if scheduled:
            # Omitted for a local-only exporter (no scheduler configured): nothing is down.
            yield _family(
                n.SCHEDULER_UP, [(lv, 1.0 if s.scheduler_up else 0.0) for lv, s in scheduled]
            )
        for metric, attr in (
            (n.SCHEDULER_WORKERS, "scheduler_workers"),
            (n.EXPORTER_POLL_DURATION_SECONDS, "poll_duration"),
            (n.EXPORTER_LAST_SUCCESS_TIMESTAMP_SECONDS, "last_success"),
        ):
            values = [(lv, getattr(s, attr)) for lv, s in parts if getattr(s, attr) is not None]
            if values:
                yield _family(metric, values)
        polls = CounterMetricFamily(n.EXPORTER_POLLS_TOTAL.family, n.EXPORTER_POLLS_TOTAL.help)
        for lv, s in parts:
            polls.add_sample(n.EXPORTER_POLLS_TOTAL.name, lv, s.polls_total)
        yield polls
        if scheduled:
            yield _family(
                n.EXPORTER_SKIPPED_WORKERS, [(lv, s.skipped_workers) for lv, s in scheduled]
            )
        gauges: dict[Metric, list[tuple[dict[str, str], float]]] = {}
        for lv, s in parts:
            for metric, value in s.source_gauges.items():
                gauges.setdefault(metric, []).append((lv, value))
        for metric, values in gauges.items():
            yield _family(metric, values)
        success = _labelled(n.EXPORTER_SOURCE_SUCCESS)
        duration = _labelled(n.EXPORTER_SOURCE_DURATION_SECONDS)
        errors = CounterMetricFamily(
            n.EXPORTER_SOURCE_ERRORS_TOTAL.family,
            n.EXPORTER_SOURCE_ERRORS_TOTAL.help,
            labels=list(n.EXPORTER_SOURCE_ERRORS_TOTAL.labels),
        )
        for lv, snap in parts:
            for st in snap.sources:
                labels = {**lv, n.LABEL_SOURCE: st.name}
                success.add_sample(success.name, labels, 1.0 if st.success else 0.0)
                duration.add_sample(duration.name, labels, st.duration)
                for reason, count in st.errors:
                    errors.add_sample(
                        n.EXPORTER_SOURCE_ERRORS_TOTAL.name,
                        {**labels, n.LABEL_REASON: reason},
                        count,
                    )
        yield success
        yield duration
        yield errors
        yield InfoMetricFamily(
            n.EXPORTER_BUILD_INFO.family, n.EXPORTER_BUILD_INFO.help, value=_VERSION_LABELS
        )


def cluster_totals(snapshot: Snapshot) -> dict[Metric, float]:
    """The cluster totals of ``--cluster-totals-only``; the maxima only with workers to judge."""
    ws = snapshot.workers
    out: dict[Metric, float] = {
        n.CLUSTER_PROCESS_BYTES: sum(w.memory.process for w in ws),
        n.CLUSTER_MANAGED_BYTES: sum(w.memory.managed for w in ws),
        n.CLUSTER_UNMANAGED_BYTES: sum(w.memory.unmanaged_old for w in ws),
        n.CLUSTER_UNMANAGED_RECENT_BYTES: sum(w.memory.unmanaged_recent for w in ws),
        n.CLUSTER_SPILLED_BYTES: sum(w.memory.spilled for w in ws),
        n.CLUSTER_LIMIT_BYTES: sum(w.info.memory_limit or 0 for w in ws),
        n.CLUSTER_PAUSED_WORKERS: sum(w.info.status == "paused" for w in ws),
    }
    ratios = [w.memory.process / w.info.memory_limit for w in ws if w.info.memory_limit]
    if ratios:
        out[n.CLUSTER_MAX_PROCESS_LIMIT_RATIO] = max(ratios)
    if ws:
        ages = (snapshot.time - w.info.last_seen for w in ws)
        out[n.CLUSTER_MAX_HEARTBEAT_AGE_SECONDS] = max(0.0, *ages)
    return out


class _Filtered(Collector):
    """Another collector's families, those a metric filter keeps (allow and deny lists)."""

    def __init__(self, inner: Collector, keep: Callable[[str], bool]) -> None:
        self.inner = inner
        self.keep = keep

    def describe(self) -> list[PromMetric]:
        return []

    def collect(self) -> Iterator[PromMetric]:
        for fam in self.inner.collect():
            # The name as exposed: prometheus_client drops the _total / _info suffix.
            suffix = {"counter": "_total", "info": "_info"}.get(fam.type, "")
            if self.keep(fam.name + suffix):
                yield fam


def _gauge(metric: Metric, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(metric, metric.help, value=value)


def cluster_parts(snapshot: Snapshot) -> list[tuple[str, Snapshot]]:
    """(cluster name, Snapshot) of each cluster in gateway mode, else ``[("", snapshot)]``."""
    if snapshot.clusters:
        return list(snapshot.clusters.items())
    return [("", snapshot)]


def _all_gauges(parts: list[tuple[str, Snapshot]]) -> tuple[WorkerGauge, ...]:
    """The per-worker families of every part: the core ones, then each source family once."""
    families: dict[Metric, None] = {}
    for _, snap in parts:
        families.update(dict.fromkeys(snap.families))
    return CORE_GAUGES + tuple(_plugin_gauge(m) for m in families)


def _family(metric: Metric, values: list[tuple[dict[str, str], float]]) -> GaugeMetricFamily:
    """An unlabelled gauge family, with the ``cluster`` label on the samples that have one."""
    fam = GaugeMetricFamily(metric, metric.help)
    for labels, value in values:
        fam.add_sample(metric.name, labels, value)
    return fam


def _labelled(metric: Metric) -> GaugeMetricFamily:
    return GaugeMetricFamily(metric, metric.help, labels=list(metric.labels))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(v: float) -> str:
    if isinstance(v, int) or v.is_integer():
        return str(int(v))
    return repr(v)


def write_worker_families(snapshot: Snapshot, keep: Callable[[str], bool] | None = None) -> str:
    """The per-worker families as exposition text, valid in both formats.

    Gauges with labels look the same in the Prometheus text format and in OpenMetrics; the
    label set of each worker is escaped once and reused for all its series. In gateway mode
    each cluster's workers come in turn, their label sets starting with ``cluster``. ``keep``:
    the metric filter (families it rejects are not written at all).
    """
    parts = cluster_parts(snapshot)
    clustered = bool(snapshot.clusters)
    rendered = []
    for name, snap in parts:
        pre = f'{n.LABEL_CLUSTER}="{_escape(name)}",' if clustered else ""
        labelsets = [
            f'{pre}{n.LABEL_WORKER}="{_escape(w.info.address)}",'
            f'{n.LABEL_WORKER_NAME}="{_escape(w.info.name)}"'
            for w in snap.workers
        ]
        thresholds = [
            (f',{n.LABEL_THRESHOLD}="{_escape(k)}"', r) for k, r in snap.thresholds.items()
        ]
        rendered.append((pre, snap, labelsets, thresholds))
    out: list[str] = []
    for g in _all_gauges(parts):
        name = g.metric.name
        if keep is not None and not keep(name):
            continue
        lines: list[str] = []
        for pre, snap, labelsets, thresholds in rendered:
            for w, labels in zip(snap.workers, labelsets, strict=True):
                v = g.value(w, snap)
                if v is None:
                    continue
                if g.per_threshold:
                    lines.extend(f"{name}{{{labels}{t}}} {_number(v * r)}\n" for t, r in thresholds)
                else:
                    lines.append(f"{name}{{{labels}}} {_number(v)}\n")
            if g.local_only is not None:
                for p in snap.local_only:
                    pv = g.local_only(p)
                    if pv is not None:
                        labels = (
                            f'{pre}{n.LABEL_WORKER}="",{n.LABEL_WORKER_NAME}="{_escape(p.name)}"'
                        )
                        lines.append(f"{name}{{{labels}}} {_number(pv)}\n")
        if lines:
            out.append(f"# HELP {name} {g.metric.help}\n# TYPE {name} gauge\n")
            out.extend(lines)
    return "".join(out)


@dataclass(frozen=True, slots=True)
class Exposition:
    """One Snapshot rendered in both exposition formats, plain and gzipped."""

    snapshot: Snapshot
    text: bytes
    text_gzip: bytes
    openmetrics: bytes
    openmetrics_gzip: bytes

    @classmethod
    def render(
        cls,
        snapshot: Snapshot,
        *,
        process_metrics: bool = True,
        keep: Callable[[str], bool] | None = None,
        totals_only: bool = False,
        collectors: Sequence[Collector] = (),
    ) -> Exposition:
        """Render a Snapshot, and ``collectors`` beside it (CPU-bound: the caller runs it off
        the event loop).

        ``keep``: the metric filter of the allow or deny list (None: every family);
        ``totals_only``: cluster totals instead of the per-worker families.
        """
        registry = CollectorRegistry(auto_describe=False)
        rendered: list[Collector] = [
            SnapshotCollector(snapshot, workers=False, totals=totals_only),
            *collectors,
        ]
        if process_metrics:
            rendered.append(ProcessCollector(registry=None))
        for c in rendered:
            registry.register(c if keep is None else _Filtered(c, keep))
        workers = b"" if totals_only else write_worker_families(snapshot, keep).encode()
        text = workers + generate_latest(registry)
        om = workers + generate_openmetrics(registry)
        return cls(
            snapshot=snapshot,
            text=text,
            text_gzip=gzip.compress(text, compresslevel=1),
            openmetrics=om,
            openmetrics_gzip=gzip.compress(om, compresslevel=1),
        )
