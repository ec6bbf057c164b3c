"""Rendering: the exposition of a Snapshot, linted by promtool and parsed back."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import replace
from typing import Any

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_om
from prometheus_client.parser import text_string_to_metric_families

from dask_memory_exporter import names as n
from dask_memory_exporter.collector import Exposition
from dask_memory_exporter.gateway import GATEWAY_CLUSTERS, GATEWAY_UP
from dask_memory_exporter.memory import MemoryBreakdown, WorkerReading
from dask_memory_exporter.names import worker_gauge
from dask_memory_exporter.scheduler import WorkerInfo, decode_identity
from dask_memory_exporter.snapshot import Snapshot, SourceStatus, WorkerSnapshot
from dask_memory_exporter.source import LocalOnlyProcess
from tests.support.live import parse as samples

MiB = 2**20
THRESHOLDS = {"target": 0.6, "spill": 0.7, "pause": 0.8, "terminate": 0.95}


TASKS = worker_gauge("dask_memory_worker_collector_test_tasks", "A plug-in family of the test.")


def worker(
    name: str,
    limit: int | None,
    status: str = "running",
    rss: int | None = None,
    *,
    k: int = 0,
    tasks: float | None = None,
) -> WorkerSnapshot:
    """A worker whose figures all differ with ``k`` (so no two workers share a value)."""
    addr = f"tcp://10.0.0.{len(name)}:4{len(name)}000"
    r = WorkerReading(
        process=(300 + k) * MiB,
        managed_total=(150 + k) * MiB,
        spilled_memory=50 * MiB,
        spilled_disk=(40 + k) * MiB,
        heartbeat_time=1000.0 - k,
    )
    info = WorkerInfo(
        address=addr,
        name=name,
        host="10.0.0.1",
        nthreads=1,
        memory_limit=limit,
        status=status,
        last_seen=1000.0 - k,
        nanny=None,
        reading=r,
    )
    mem = MemoryBreakdown(
        process=(rss if rss is not None else (300 + k) * MiB),
        managed=(100 + k) * MiB,
        unmanaged_old=(150 - k) * MiB,
        spilled=(40 + k) * MiB,
    )
    values = {} if tasks is None else {TASKS: tasks}
    return WorkerSnapshot(info=info, memory=mem, rss=rss, values=values)


def snapshot(
    *workers: WorkerSnapshot, up: bool = True, local_only: tuple[LocalOnlyProcess, ...] = ()
) -> Snapshot:
    return Snapshot(
        time=1002.5,
        workers=workers,
        local_only=local_only,
        thresholds=THRESHOLDS,
        families=(TASKS,),
        scheduler_up=up,
        scheduler_workers=len(workers),
        polled=True,
        sources=(
            SourceStatus("scheduler", up, 0.002, (("refused", 1), ("timeout", 0))),
            SourceStatus("local", True, 0.001, (("unreadable", 0),)),
        ),
        source_gauges={n.EXPORTER_LOCAL_UNREADABLE_PROCESSES: 2},
        poll_duration=0.002,
        last_success=1002.5,
        polls_total=10,
    )


def value(text: str, name: str, **labels: str) -> float:
    return samples(text)[(name, tuple(sorted(labels.items())))]


def test_worker_series_and_values() -> None:
    expo = Exposition.render(
        snapshot(worker("a", 1000 * MiB, "paused"), worker("bb", None)), process_metrics=False
    )
    text = expo.text.decode()
    addr_a = "tcp://10.0.0.1:41000"
    lab = {"worker": addr_a, "worker_name": "a"}
    assert value(text, n.WORKER_PROCESS_BYTES, **lab) == 300 * MiB
    assert value(text, n.WORKER_MANAGED_BYTES, **lab) == 100 * MiB
    assert value(text, n.WORKER_UNMANAGED_BYTES, **lab) == 150 * MiB
    assert value(text, n.WORKER_UNMANAGED_RECENT_BYTES, **lab) == 50 * MiB
    assert value(text, n.WORKER_SPILLED_BYTES, **lab) == 40 * MiB
    assert value(text, n.WORKER_LIMIT_BYTES, **lab) == 1000 * MiB
    assert value(text, n.WORKER_PAUSED, **lab) == 1
    assert value(text, n.WORKER_HEARTBEAT_AGE_SECONDS, **lab) == 2.5
    for key, ratio in THRESHOLDS.items():
        assert value(text, n.WORKER_THRESHOLD_RATIO, threshold=key, **lab) == ratio
    # A worker without a limit has no limit and no threshold series, but its memory is there.
    no_limit = {"worker": "tcp://10.0.0.2:42000", "worker_name": "bb"}
    s = samples(text)
    assert (n.WORKER_LIMIT_BYTES, tuple(sorted(no_limit.items()))) not in s
    assert value(text, n.WORKER_PROCESS_BYTES, **no_limit) == 300 * MiB
    assert value(text, n.WORKER_PAUSED, **no_limit) == 0
    assert n.WORKER_RSS_BYTES not in text  # only in local mode
    assert value(text, n.SCHEDULER_UP) == 1
    errors = n.EXPORTER_SOURCE_ERRORS_TOTAL
    assert value(text, errors, source="scheduler", reason="refused") == 1
    assert value(text, errors, source="scheduler", reason="timeout") == 0
    assert value(text, errors, source="local", reason="unreadable") == 0
    assert value(text, n.EXPORTER_LOCAL_UNREADABLE_PROCESSES) == 2


def test_sidecar_series_only_where_rss_was_read() -> None:
    """Direct RSS and the heartbeat's own figure beside it, only for workers read from the OS;
    a process the scheduler has not reported gets its RSS and nothing else."""
    snap = snapshot(
        worker("a", None, rss=123, k=3),
        worker("bb", None),
        local_only=(LocalOnlyProcess("w-new", 77, 456),),
    )
    s = samples(Exposition.render(snap, process_metrics=False).text.decode())
    a = (("worker", "tcp://10.0.0.1:41000"), ("worker_name", "a"))
    new = (("worker", ""), ("worker_name", "w-new"))
    assert {k[1]: v for k, v in s.items() if k[0] == n.WORKER_RSS_BYTES} == {a: 123, new: 456}
    hb = {k[1]: v for k, v in s.items() if k[0] == n.WORKER_HEARTBEAT_PROCESS_BYTES}
    assert hb == {a: 303 * MiB}
    assert (n.WORKER_PROCESS_BYTES, a) in s and (n.WORKER_PROCESS_BYTES, new) not in s
    assert s[(n.WORKER_PROCESS_BYTES, a)] == 123


def test_plugin_family_only_for_workers_that_report_it() -> None:
    snap = snapshot(worker("a", None, tasks=3), worker("bb", None))
    s = samples(Exposition.render(snap, process_metrics=False).text.decode())
    assert {dict(k[1])["worker_name"]: v for k, v in s.items() if k[0] == TASKS} == {"a": 3}


def test_no_workers_only_self_metrics() -> None:
    text = Exposition.render(snapshot(up=False), process_metrics=True).text.decode()
    names = {k[0] for k in samples(text)}
    assert n.WORKER_PROCESS_BYTES not in names
    assert value(text, n.SCHEDULER_UP) == 0
    assert "process_resident_memory_bytes" in names


def test_label_values_are_escaped() -> None:
    text = Exposition.render(
        snapshot(worker('we"ird\\na\nme', 1000 * MiB)), process_metrics=False
    ).text.decode()
    names = {dict(k[1]).get("worker_name") for k in samples(text)}
    assert 'we"ird\\na\nme' in names


def test_openmetrics_parses_and_ends_with_eof() -> None:
    expo = Exposition.render(snapshot(worker("a", 1000 * MiB)), process_metrics=False)
    om = expo.openmetrics.decode()
    assert om.endswith("# EOF\n")
    fams = {f.name: f for f in parse_om(om)}
    assert fams[n.EXPORTER_POLLS_TOTAL.family].type == "counter"
    assert fams[n.EXPORTER_SOURCE_ERRORS_TOTAL.family].type == "counter"
    assert fams[n.WORKER_PROCESS_BYTES].samples[0].value == 300 * MiB


def test_never_clashes_with_dask_builtin_families() -> None:
    text = Exposition.render(snapshot(worker("a", 1000 * MiB))).text.decode()
    for fam in text_string_to_metric_families(text):
        assert not fam.name.startswith(("dask_worker_", "dask_scheduler_")), fam.name


def test_promtool_check_metrics_passes() -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is installed by ./dev test (Debian package prometheus)"
    snap = snapshot(
        worker("a", 1000 * MiB, tasks=1),
        worker("bb", None, rss=5, k=1),
        local_only=(LocalOnlyProcess("pid:9", 9, 7),),
    )
    expo = Exposition.render(snap)
    proc = subprocess.run(
        [promtool, "check", "metrics"], input=expo.text, capture_output=True, timeout=30
    )
    assert proc.returncode == 0, proc.stdout.decode() + proc.stderr.decode()


# --- decoding: a worker entry shaped like the scheduler's identity() output -----------------
def identity_entry(**overrides: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "type": "Worker",
        "id": 0,
        "host": "127.0.0.1",
        "name": 0,
        "nthreads": 1,
        "memory_limit": 400 * MiB,
        "last_seen": 1000.0,
        "status": "running",
        "nanny": "tcp://127.0.0.1:1234",
        "services": {"dashboard": 3456},
        "metrics": {
            "memory": 100 * MiB,
            "managed_bytes": 10 * MiB,
            "spilled_bytes": {"memory": 0, "disk": 0},
            "cpu": 1.0,
            "digests_total_since_heartbeat": {("a", "b"): 1.0},
        },
    }
    entry.update(overrides)
    return entry


@pytest.mark.parametrize(
    "bad",
    [
        {"metrics": None},
        {"metrics": {"memory": 1}},
        {
            "metrics": {
                "memory": "lots",
                "managed_bytes": 0,
                "spilled_bytes": {"memory": 0, "disk": 0},
            }
        },
        {
            "metrics": {
                "memory": float("nan"),
                "managed_bytes": 0,
                "spilled_bytes": {"memory": 0, "disk": 0},
            }
        },
        {"last_seen": None},
        {"memory_limit": "400MiB"},
    ],
)
def test_malformed_worker_is_skipped_and_counted(bad: dict[str, Any]) -> None:
    poll = decode_identity(
        {
            "address": "tcp://s:1",
            "workers": {
                "tcp://good:1": identity_entry(),
                "tcp://bad:1": identity_entry(**bad),
                "tcp://good:2": identity_entry(name="other"),
            },
        }
    )
    assert set(poll.workers) == {"tcp://good:1", "tcp://good:2"}
    assert poll.skipped == 1


def test_worker_without_limit_decodes() -> None:
    poll = decode_identity({"workers": {"tcp://w:1": identity_entry(memory_limit=0)}})
    assert poll.workers["tcp://w:1"].memory_limit is None


def _reference(snap: Snapshot, openmetrics: bool) -> str:
    """prometheus_client's own rendering of the full collector."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.exposition import generate_latest
    from prometheus_client.openmetrics.exposition import generate_latest as generate_om

    from dask_memory_exporter.collector import SnapshotCollector

    reg = CollectorRegistry(auto_describe=False)
    reg.register(SnapshotCollector(snap))
    return (generate_om(reg) if openmetrics else generate_latest(reg)).decode()


def _families(text: str, openmetrics: bool) -> dict[str, Any]:
    parser = parse_om if openmetrics else text_string_to_metric_families
    return {
        f.name: (
            f.type,
            f.documentation,
            sorted((s.name, tuple(sorted(s.labels.items())), s.value) for s in f.samples),
        )
        for f in parser(text)
    }


@pytest.mark.parametrize("openmetrics", [False, True])
def test_direct_writer_equals_prometheus_client(openmetrics: bool) -> None:
    snap = snapshot(
        worker("a", 1000 * MiB, "paused", tasks=4),
        worker("bb", None, rss=77 * MiB, k=1, tasks=0.5),
        worker('odd "na\\me"\n', 2000 * MiB, rss=5, k=2),
        local_only=(LocalOnlyProcess('lo"cal', 31, 12 * MiB), LocalOnlyProcess("pid:32", 32, 1)),
    )
    expo = Exposition.render(snap, process_metrics=False)
    fast = (expo.openmetrics if openmetrics else expo.text).decode()
    families = _families(fast, openmetrics)
    assert families == _families(_reference(snap, openmetrics), openmetrics)
    # Not vacuous: the plug-in family and the local-only process are in both renderings.
    assert len(families[TASKS][2]) == 2
    assert len(families[n.WORKER_RSS_BYTES][2]) == 4


# --- gateway mode: one Snapshot per cluster, labelled cluster --------------------------------
def gateway_snapshot() -> Snapshot:
    """The gateway's own status, with two clusters' Snapshots (one down, with no workers)."""
    down = snapshot(up=False)
    return Snapshot(
        time=1002.5,
        thresholds=THRESHOLDS,
        has_scheduler=False,
        polled=True,
        sources=(SourceStatus("gateway", True, 0.01, (("auth", 2), ("timeout", 0))),),
        source_gauges={GATEWAY_UP: 1, GATEWAY_CLUSTERS: 2},
        poll_duration=0.02,
        last_success=1001.0,
        polls_total=7,
        clusters={
            'alice"s': snapshot(worker("a", 1000 * MiB, tasks=4), worker("bb", None, k=1)),
            "bob": replace(down, polls_total=3),
        },
    )


@pytest.mark.parametrize("openmetrics", [False, True])
def test_gateway_mode_labels_every_cluster_series_and_writers_agree(openmetrics: bool) -> None:
    snap = gateway_snapshot()
    expo = Exposition.render(snap, process_metrics=False)
    fast = (expo.openmetrics if openmetrics else expo.text).decode()
    families = _families(fast, openmetrics)
    assert families == _families(_reference(snap, openmetrics), openmetrics)
    for name, (_, _, series) in families.items():
        for _, labels, _ in series:
            keys = dict(labels)
            if name.startswith("dask_memory_worker_"):
                assert keys[n.LABEL_CLUSTER] == 'alice"s', (name, labels)
    text = expo.text.decode()
    assert value(text, n.SCHEDULER_UP, cluster='alice"s') == 1
    assert value(text, n.SCHEDULER_UP, cluster="bob") == 0
    assert (n.SCHEDULER_UP, ()) not in samples(text)  # the gateway itself has no scheduler
    assert value(text, n.EXPORTER_POLLS_TOTAL, cluster="bob") == 3
    assert value(text, n.EXPORTER_POLLS_TOTAL) == 7
    assert value(text, GATEWAY_CLUSTERS) == 2
    assert value(text, n.EXPORTER_SOURCE_ERRORS_TOTAL, source="gateway", reason="auth") == 2
    assert value(text, n.EXPORTER_SOURCE_SUCCESS, cluster="bob", source="scheduler") == 0
    assert value(text, n.WORKER_PROCESS_BYTES, cluster='alice"s', worker="tcp://10.0.0.1:41000",
                 worker_name="a") == 300 * MiB  # fmt: skip
    assert len(families[n.WORKER_THRESHOLD_RATIO][2]) == 4  # bb has no limit


def test_gateway_mode_passes_promtool_check_metrics() -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is installed by ./dev test (Debian package prometheus)"
    expo = Exposition.render(gateway_snapshot())
    proc = subprocess.run(
        [promtool, "check", "metrics"], input=expo.text, capture_output=True, timeout=30
    )
    assert proc.returncode == 0, proc.stdout.decode() + proc.stderr.decode()
