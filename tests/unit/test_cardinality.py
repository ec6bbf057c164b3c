"""Cardinality controls: metric allow and deny lists, and cluster totals only."""

from __future__ import annotations

import pytest

from dask_memory_exporter import names as n
from dask_memory_exporter.collector import Exposition, cluster_totals
from dask_memory_exporter.config import ConfigError, load_settings
from dask_memory_exporter.memory import MemoryModel, WorkerReading
from dask_memory_exporter.snapshot import Snapshot, WorkerSnapshot
from dask_memory_exporter.source import WorkerInfo
from tests.support.live import parse

MiB = 2**20


def snapshot(count: int = 3, paused: int = 1) -> Snapshot:
    infos = {
        f"tcp://10.0.0.{i}:1": WorkerInfo(
            address=f"tcp://10.0.0.{i}:1",
            name=f"w{i}",
            host=f"10.0.0.{i}",
            nthreads=1,
            memory_limit=1000 * MiB,
            status="paused" if i < paused else "running",
            last_seen=100.0 - i,
            nanny=None,
            reading=WorkerReading((100 + 100 * i) * MiB, 10 * MiB, 0, 5 * MiB, 100.0 - i),
        )
        for i in range(count)
    }
    memory = MemoryModel(30.0).update({a: w.reading for a, w in infos.items()})
    workers = tuple(WorkerSnapshot(info=w, memory=memory[a]) for a, w in infos.items())
    return Snapshot(
        time=110.0,
        workers=workers,
        thresholds={"target": 0.6, "spill": 0.7, "pause": 0.8, "terminate": 0.95},
        scheduler_up=True,
        scheduler_workers=count,
        polled=True,
    )


def names_in(expo: Exposition) -> set[str]:
    return {name for name, _ in parse(expo.text.decode())} | {
        name for name, _ in parse(expo.openmetrics.decode())
    }


def keep(**options: str | bool):  # type: ignore[no-untyped-def]
    return load_settings({"scheduler": "tcp://s:1", **options}).metric_filter()


def test_denylist_drops_matching_families_only() -> None:
    expo = Exposition.render(
        snapshot(), keep=keep(metric_denylist="dask_memory_worker_threshold_ratio,process_.*")
    )
    got = names_in(expo)
    assert n.WORKER_THRESHOLD_RATIO not in got
    assert not any(name.startswith("process_") for name in got)
    assert {n.WORKER_PROCESS_BYTES, n.SCHEDULER_UP, "dask_memory_exporter_polls_total"} <= got


def test_allowlist_keeps_matching_families_only_counters_by_their_exposed_name() -> None:
    expo = Exposition.render(
        snapshot(),
        keep=keep(metric_allowlist="dask_memory_worker_process_bytes,.*_polls_total"),
    )
    got = {name for name in names_in(expo) if not name.endswith("_created")}
    assert got == {n.WORKER_PROCESS_BYTES, "dask_memory_exporter_polls_total"}


def test_patterns_match_whole_names() -> None:
    f = keep(metric_allowlist="dask_memory_worker_process")
    assert f is not None and not f(n.WORKER_PROCESS_BYTES)


@pytest.mark.parametrize(
    "options",
    [
        {"metric_allowlist": "a", "metric_denylist": "b"},
        {"metric_denylist": "dask_(memory"},
    ],
)
def test_bad_filters_are_one_line_errors(options: dict[str, str]) -> None:
    with pytest.raises(ConfigError) as e:
        load_settings({"scheduler": "tcp://s:1", **options})
    assert "\n" not in str(e.value)


def test_cluster_totals_only_has_no_per_worker_series() -> None:
    snap = snapshot()
    expo = Exposition.render(snap, totals_only=True)
    samples = parse(expo.text.decode())
    assert not any("worker" in dict(labels) for _, labels in samples)
    totals = {name: v for (name, labels), v in samples.items() if name in n.CLUSTER_FAMILIES}
    assert set(totals) == set(n.CLUSTER_FAMILIES)
    assert totals[n.CLUSTER_PROCESS_BYTES] == sum(w.memory.process for w in snap.workers)
    assert totals[n.CLUSTER_LIMIT_BYTES] == 3000 * MiB
    assert totals[n.CLUSTER_PAUSED_WORKERS] == 1
    assert totals[n.CLUSTER_MAX_PROCESS_LIMIT_RATIO] == pytest.approx(0.3)
    assert totals[n.CLUSTER_MAX_HEARTBEAT_AGE_SECONDS] == pytest.approx(12.0)
    # the same number of series whatever the cluster's size
    big = Exposition.render(snapshot(50), totals_only=True)
    assert len(parse(big.text.decode())) == len(samples)


def test_cluster_totals_of_no_workers_omit_the_maxima() -> None:
    totals = cluster_totals(snapshot(0))
    assert totals[n.CLUSTER_PROCESS_BYTES] == 0
    assert n.CLUSTER_MAX_HEARTBEAT_AGE_SECONDS not in totals
    assert n.CLUSTER_MAX_PROCESS_LIMIT_RATIO not in totals


def test_cluster_totals_per_gateway_cluster() -> None:
    """With a gateway, one total per cluster, labelled ``cluster``."""
    top = Snapshot(time=110.0, clusters={"a": snapshot(2), "b": snapshot(3)})
    samples = parse(Exposition.render(top, totals_only=True).text.decode())
    workers = {
        dict(labels)["cluster"]: v
        for (name, labels), v in samples.items()
        if name == n.CLUSTER_LIMIT_BYTES
    }
    assert workers == {"a": 2000 * MiB, "b": 3000 * MiB}
    assert not any("worker" in dict(labels) for _, labels in samples)
