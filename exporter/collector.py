"""SnapshotCollector: Prometheus metric families built fresh from one Snapshot.

A custom prometheus_client collector, never labelled global gauges: each collect() emits only
the workers of the current Snapshot, so a worker that leaves is gone from the next scrape
after the next poll. The Snapshot changes once per poll, so ``Exposition`` renders the
families once per poll (both text formats, and gzip) and the HTTP layer serves cached bytes.
collect() never awaits and never does I/O.
"""

from __future__ import annotations

import gzip
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.exposition import generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.registry import Collector

from . import names as n
from .snapshot import Snapshot

__all__ = ["Exposition", "SnapshotCollector", "package_version"]

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


class SnapshotCollector(Collector):
    """Renders one Snapshot. Construct a new one per Snapshot; collect() is pure."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot

    def describe(self) -> list[Metric]:
        # Registering must not trigger a collect (prometheus_client calls describe()).
        return []

    def collect(self) -> Iterator[Metric]:
        yield from self._worker_families()
        yield from self._self_families()

    def _worker_families(self) -> Iterator[Metric]:
        snap = self.snapshot
        labels = list(n.WORKER_LABELS)

        def g(name: str, doc: str, extra: Iterable[str] = ()) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=[*labels, *extra])

        process = g(n.WORKER_PROCESS_BYTES, "Worker process memory (RSS) in bytes.")
        managed = g(n.WORKER_MANAGED_BYTES, "Managed memory in RAM (Dask keys) in bytes.")
        unmanaged = g(
            n.WORKER_UNMANAGED_BYTES,
            "Unmanaged (old) memory in bytes: the minimum over recent-to-old-time.",
        )
        recent = g(
            n.WORKER_UNMANAGED_RECENT_BYTES,
            "Unmanaged memory that appeared within recent-to-old-time, in bytes.",
        )
        spilled = g(n.WORKER_SPILLED_BYTES, "Managed data spilled to disk, in bytes on disk.")
        limit = g(n.WORKER_LIMIT_BYTES, "Worker memory_limit in bytes.")
        threshold = g(
            n.WORKER_THRESHOLD_RATIO,
            "Memory-manager thresholds as a fraction of memory_limit.",
            [n.LABEL_THRESHOLD],
        )
        paused = g(n.WORKER_PAUSED, "1 if the worker is paused, else 0.")
        age = g(
            n.WORKER_HEARTBEAT_AGE_SECONDS,
            "Seconds since the scheduler last received a heartbeat from the worker.",
        )
        rss = g(n.WORKER_RSS_BYTES, "Worker RSS in bytes, read directly from the OS (local mode).")
        thresholds = list(snap.thresholds.items())
        for w in snap.workers:
            info, mem = w.info, w.memory
            lv = [info.address, info.name]
            process.add_metric(lv, mem.process)
            managed.add_metric(lv, mem.managed)
            unmanaged.add_metric(lv, mem.unmanaged_old)
            recent.add_metric(lv, mem.unmanaged_recent)
            spilled.add_metric(lv, mem.spilled)
            if info.memory_limit:
                limit.add_metric(lv, info.memory_limit)
                for key, value in thresholds:
                    threshold.add_metric([*lv, key], value)
            paused.add_metric(lv, 1.0 if info.status == "paused" else 0.0)
            age.add_metric(lv, max(0.0, snap.time - info.last_seen))
            if w.rss is not None:
                rss.add_metric(lv, w.rss)
        families = [process, managed, unmanaged, recent, spilled, limit, threshold, paused, age]
        if any(w.rss is not None for w in snap.workers):
            families.append(rss)
        yield from families

    def _self_families(self) -> Iterator[Metric]:
        snap = self.snapshot
        yield GaugeMetricFamily(
            n.SCHEDULER_UP,
            "1 if the last poll of the scheduler succeeded, else 0.",
            value=1.0 if snap.scheduler_up else 0.0,
        )
        if snap.scheduler_workers is not None:
            yield GaugeMetricFamily(
                n.SCHEDULER_WORKERS,
                "Workers the scheduler reported in the last successful poll.",
                value=snap.scheduler_workers,
            )
        if snap.poll_duration is not None:
            yield GaugeMetricFamily(
                n.EXPORTER_POLL_DURATION_SECONDS,
                "Duration of the last poll in seconds.",
                value=snap.poll_duration,
            )
        if snap.last_success is not None:
            yield GaugeMetricFamily(
                n.EXPORTER_LAST_SUCCESS_TIMESTAMP_SECONDS,
                "Unix time of the last successful poll of the scheduler.",
                value=snap.last_success,
            )
        yield CounterMetricFamily(
            n.EXPORTER_POLLS_TOTAL.removesuffix("_total"),
            "Polls attempted since the exporter started.",
            value=snap.polls_total,
        )
        yield CounterMetricFamily(
            n.EXPORTER_POLL_ERRORS_TOTAL.removesuffix("_total"),
            "Failed polls since the exporter started.",
            value=snap.poll_errors_total,
        )
        yield GaugeMetricFamily(
            n.EXPORTER_SKIPPED_WORKERS,
            "Worker entries skipped in the last poll (missing or malformed fields).",
            value=snap.skipped_workers,
        )
        success = GaugeMetricFamily(
            n.EXPORTER_SOURCE_SUCCESS,
            "1 if the source succeeded in the last poll, else 0.",
            labels=[n.LABEL_SOURCE],
        )
        duration = GaugeMetricFamily(
            n.EXPORTER_SOURCE_DURATION_SECONDS,
            "Duration of the source in the last poll, in seconds.",
            labels=[n.LABEL_SOURCE],
        )
        for s in snap.sources:
            success.add_metric([s.name], 1.0 if s.success else 0.0)
            duration.add_metric([s.name], s.duration)
        yield success
        yield duration
        yield InfoMetricFamily(
            n.EXPORTER_BUILD_INFO.removesuffix("_info"),
            "Version of the exporter and of distributed.",
            value=_VERSION_LABELS,
        )


@dataclass(frozen=True, slots=True)
class Exposition:
    """One Snapshot rendered in both exposition formats, plain and gzipped."""

    snapshot: Snapshot
    text: bytes
    text_gzip: bytes
    openmetrics: bytes
    openmetrics_gzip: bytes

    @classmethod
    def render(cls, snapshot: Snapshot, *, process_metrics: bool = True) -> Exposition:
        """Render a Snapshot (CPU-bound: the caller runs it off the event loop)."""
        registry = CollectorRegistry(auto_describe=False)
        registry.register(SnapshotCollector(snapshot))
        if process_metrics:
            ProcessCollector(registry=registry)
        text = generate_latest(registry)
        om = generate_openmetrics(registry)
        return cls(
            snapshot=snapshot,
            text=text,
            text_gzip=gzip.compress(text, compresslevel=1),
            openmetrics=om,
            openmetrics_gzip=gzip.compress(om, compresslevel=1),
        )
