"""SnapshotCollector: Prometheus metric families built fresh from one Snapshot.

A custom prometheus_client collector, never labelled global gauges: each collect() emits only
the workers of the current Snapshot, so a worker that leaves is gone from the next scrape
after the next poll. The Snapshot changes once per poll, so ``Exposition`` renders the
families once per poll (both text formats, and gzip) and the HTTP layer serves cached bytes.
collect() never awaits and never does I/O.
"""

from __future__ import annotations

import gzip
from collections.abc import Callable, Iterator
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
from .snapshot import Snapshot, WorkerSnapshot

__all__ = [
    "WORKER_GAUGES",
    "Exposition",
    "SnapshotCollector",
    "package_version",
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
    """One per-worker gauge family: its name, help text and how to read it from a worker.

    ``value`` returns None where the worker has no such figure (no limit, no direct RSS): the
    series is omitted rather than exported as 0 or NaN. ``per_threshold`` families carry one
    series per memory-manager threshold, with the ``threshold`` label.
    """

    name: str
    doc: str
    value: Callable[[WorkerSnapshot, Snapshot], float | None]
    per_threshold: bool = False


def _limited(w: WorkerSnapshot, v: float) -> float | None:
    return v if w.info.memory_limit else None


def _heard(
    read: Callable[[WorkerSnapshot, Snapshot], float | None],
) -> Callable[[WorkerSnapshot, Snapshot], float | None]:
    """A heartbeat figure: none for a local process the scheduler has not reported."""
    return lambda w, s: None if w.local_only else read(w, s)


WORKER_GAUGES: tuple[WorkerGauge, ...] = (
    WorkerGauge(
        n.WORKER_PROCESS_BYTES,
        "Worker process memory (RSS) in bytes.",
        _heard(lambda w, s: w.memory.process),
    ),
    WorkerGauge(
        n.WORKER_MANAGED_BYTES,
        "Managed memory in RAM (Dask keys) in bytes.",
        _heard(lambda w, s: w.memory.managed),
    ),
    WorkerGauge(
        n.WORKER_UNMANAGED_BYTES,
        "Unmanaged (old) memory in bytes: the minimum over recent-to-old-time.",
        _heard(lambda w, s: w.memory.unmanaged_old),
    ),
    WorkerGauge(
        n.WORKER_UNMANAGED_RECENT_BYTES,
        "Unmanaged memory that appeared within recent-to-old-time, in bytes.",
        _heard(lambda w, s: w.memory.unmanaged_recent),
    ),
    WorkerGauge(
        n.WORKER_SPILLED_BYTES,
        "Managed data spilled to disk, in bytes on disk.",
        _heard(lambda w, s: w.memory.spilled),
    ),
    WorkerGauge(
        n.WORKER_LIMIT_BYTES, "Worker memory_limit in bytes.", lambda w, s: w.info.memory_limit
    ),
    WorkerGauge(
        n.WORKER_THRESHOLD_RATIO,
        "Memory-manager thresholds as a fraction of memory_limit.",
        _heard(lambda w, s: _limited(w, 1.0)),
        per_threshold=True,
    ),
    WorkerGauge(
        n.WORKER_PAUSED,
        "1 if the worker is paused, else 0.",
        _heard(lambda w, s: 1.0 if w.info.status == "paused" else 0.0),
    ),
    WorkerGauge(
        n.WORKER_HEARTBEAT_AGE_SECONDS,
        "Seconds since the scheduler last received a heartbeat from the worker.",
        _heard(lambda w, s: max(0.0, s.time - w.info.last_seen)),
    ),
    WorkerGauge(
        n.WORKER_RSS_BYTES,
        "Worker RSS in bytes, read directly from the OS (local mode).",
        lambda w, s: w.rss,  # local processes too
    ),
)
"""The per-worker families in exposition order; ``per_threshold`` values are multiplied by
each threshold ratio (a worker without a limit has no thresholds)."""


class SnapshotCollector(Collector):
    """Renders one Snapshot. Construct a new one per Snapshot; collect() is pure.

    The reference rendering through prometheus_client; ``Exposition`` writes the per-worker
    families directly from the same ``WORKER_GAUGES`` table (10x to 17x faster at 1,000
    workers), and a unit test checks that both parse to the same samples.
    """

    def __init__(self, snapshot: Snapshot, *, workers: bool = True) -> None:
        self.snapshot = snapshot
        self.workers = workers

    def describe(self) -> list[Metric]:
        # Registering must not trigger a collect (prometheus_client calls describe()).
        return []

    def collect(self) -> Iterator[Metric]:
        if self.workers:
            yield from self._worker_families()
        yield from self._self_families()

    def _worker_families(self) -> Iterator[Metric]:
        snap = self.snapshot
        thresholds = list(snap.thresholds.items())
        for g in WORKER_GAUGES:
            extra = [n.LABEL_THRESHOLD] if g.per_threshold else []
            fam = GaugeMetricFamily(g.name, g.doc, labels=[*n.WORKER_LABELS, *extra])
            for w in snap.workers:
                v = g.value(w, snap)
                if v is None:
                    continue
                lv = [w.info.address, w.info.name]
                if g.per_threshold:
                    for key, ratio in thresholds:
                        fam.add_metric([*lv, key], v * ratio)
                else:
                    fam.add_metric(lv, v)
            if fam.samples:
                yield fam

    def _self_families(self) -> Iterator[Metric]:
        snap = self.snapshot
        if snap.has_scheduler:
            # Omitted for a local-only exporter (no scheduler configured): nothing is down.
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


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(v: float) -> str:
    if isinstance(v, int) or v.is_integer():
        return str(int(v))
    return repr(v)


def write_worker_families(snapshot: Snapshot) -> str:
    """The per-worker families as exposition text, valid in both formats.

    Gauges with labels look the same in the Prometheus text format and in OpenMetrics; the
    label set of each worker is escaped once and reused for all its series.
    """
    workers = snapshot.workers
    labelsets = [
        f'{n.LABEL_WORKER}="{_escape(w.info.address)}",'
        f'{n.LABEL_WORKER_NAME}="{_escape(w.info.name)}"'
        for w in workers
    ]
    thresholds = [
        (f',{n.LABEL_THRESHOLD}="{_escape(k)}"', r) for k, r in snapshot.thresholds.items()
    ]
    out: list[str] = []
    for g in WORKER_GAUGES:
        lines: list[str] = []
        for w, labels in zip(workers, labelsets, strict=True):
            v = g.value(w, snapshot)
            if v is None:
                continue
            if g.per_threshold:
                lines.extend(f"{g.name}{{{labels}{t}}} {_number(v * r)}\n" for t, r in thresholds)
            else:
                lines.append(f"{g.name}{{{labels}}} {_number(v)}\n")
        if lines:
            out.append(f"# HELP {g.name} {g.doc}\n# TYPE {g.name} gauge\n")
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
    def render(cls, snapshot: Snapshot, *, process_metrics: bool = True) -> Exposition:
        """Render a Snapshot (CPU-bound: the caller runs it off the event loop)."""
        registry = CollectorRegistry(auto_describe=False)
        registry.register(SnapshotCollector(snapshot, workers=False))
        if process_metrics:
            ProcessCollector(registry=registry)
        workers = write_worker_families(snapshot).encode()
        text = workers + generate_latest(registry)
        om = workers + generate_openmetrics(registry)
        return cls(
            snapshot=snapshot,
            text=text,
            text_gzip=gzip.compress(text, compresslevel=1),
            openmetrics=om,
            openmetrics_gzip=gzip.compress(om, compresslevel=1),
        )
