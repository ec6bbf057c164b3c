"""The verdicts of ``diagnose`` (a pure function), its output, and the worker actions run here."""

from __future__ import annotations

import ast
import gc
import io
import json
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from distributed.protocol.pickle import dumps

from dask_memory_exporter import worker_actions
from dask_memory_exporter.cli import main
from dask_memory_exporter.diagnose import (
    LEAK_LIMIT_SHARE,
    LEAK_MIN_BYTES,
    SIGNIFICANT_BYTES,
    GcResult,
    Outcome,
    Progress,
    TrimResult,
    WorkerFacts,
    assess,
    facts_from,
    leak_threshold,
    render_table,
    sample_memory,
    select_workers,
    to_json,
)
from dask_memory_exporter.memory import MemoryBreakdown
from dask_memory_exporter.scheduler import decode_identity

MiB = 2**20
GiB = 2**30
BASE = 60 * MiB  # a bare worker's own unmanaged memory


def facts(
    *,
    old: int = BASE,
    recent: int = 0,
    managed: int = 0,
    executing: int | None = 0,
    gc_freed: int = 0,
    trim_freed: int | None = 0,
    limit: int | None = GiB,
    threshold: str | None = "65536",
) -> WorkerFacts:
    process = managed + old + recent
    after_gc = process - gc_freed
    trim = (
        TrimResult(available=False, reason="not available on darwin")
        if trim_freed is None
        else TrimResult(available=True, rss_before=after_gc, rss_after=after_gc - trim_freed)
    )
    return WorkerFacts(
        name="w",
        address="tcp://127.0.0.1:1",
        memory_limit=limit,
        memory=MemoryBreakdown(process=process, managed=managed, unmanaged_old=old, spilled=0),
        executing=executing,
        gc=GcResult(rss_before=process, rss_after=after_gc, collected=10),
        trim=trim,
        trim_threshold=threshold,
    )


def verdicts(f: WorkerFacts) -> list[str]:
    return [x.verdict for x in assess(f)]


def test_a_healthy_worker_is_ok() -> None:
    assert verdicts(facts()) == ["ok"]


def test_garbage_when_gc_frees_a_significant_share() -> None:
    f = facts(old=BASE + 300 * MiB, gc_freed=300 * MiB)
    assert verdicts(f) == ["garbage"]
    assert "300.00 MiB" in assess(f)[0].reason


def test_allocator_when_trim_frees_it_and_the_step_depends_on_the_variable() -> None:
    unset = assess(facts(old=BASE + 300 * MiB, trim_freed=300 * MiB, threshold=None))
    assert [x.verdict for x in unset] == ["allocator"]
    assert "MALLOC_TRIM_THRESHOLD_=65536" in unset[0].next_step
    assert "lacks it" in unset[0].next_step
    kept = assess(facts(old=BASE + 300 * MiB, trim_freed=300 * MiB, threshold="65536"))
    assert "jemalloc" in kept[0].next_step
    assert "lacks it" not in kept[0].next_step


def test_leak_when_old_memory_stays_after_both() -> None:
    f = facts(old=BASE + 500 * MiB)
    assert verdicts(f) == ["leak"]
    assert "tracemalloc" in assess(f)[0].next_step


def test_task_heap_when_tasks_run_and_memory_is_recent() -> None:
    assert verdicts(facts(recent=400 * MiB, executing=2)) == ["task-heap"]
    # The same memory with no task running is not a task heap.
    assert verdicts(facts(recent=400 * MiB, executing=0)) == ["ok"]
    # Unknown task count (an old worker): no task-heap verdict rather than a guess.
    assert verdicts(facts(recent=400 * MiB, executing=None)) == ["ok"]
    # Tasks running, but most unmanaged memory is old: not (only) a task heap.
    assert verdicts(facts(old=BASE + 500 * MiB, recent=40 * MiB, executing=1)) == ["leak"]


def test_findings_follow_the_playbook_order() -> None:
    f = facts(old=BASE + 900 * MiB, recent=300 * MiB, executing=1, gc_freed=300 * MiB)
    # recent 300 of 1.2 GiB is not a task heap; gc freed 300 MiB; 600 MiB+ of old stays.
    assert verdicts(f) == ["garbage", "leak"]
    g = facts(old=BASE + 700 * MiB, executing=1, recent=900 * MiB, gc_freed=400 * MiB)
    assert verdicts(g) == ["task-heap", "garbage", "leak"]


def test_small_gains_are_noise() -> None:
    just_below = SIGNIFICANT_BYTES - 1
    assert verdicts(facts(old=BASE, gc_freed=just_below, trim_freed=0)) == ["ok"]
    # Enough bytes, but a small share of a large remainder: the remainder is the story.
    f = facts(old=BASE + 2 * GiB, gc_freed=40 * MiB, limit=8 * GiB)
    assert verdicts(f) == ["leak"]


def test_trim_not_available_is_no_allocator_verdict() -> None:
    f = facts(old=BASE + 300 * MiB, trim_freed=None)
    assert not f.trim.available
    assert verdicts(f) == ["leak"]  # what gc did not free stays, trim could not say more
    assert f.unmanaged_after == f.gc.rss_after


def test_leak_threshold() -> None:
    assert leak_threshold(None) == LEAK_MIN_BYTES
    assert leak_threshold(GiB) == LEAK_MIN_BYTES  # a fifth of 1 GiB is below the floor
    assert leak_threshold(16 * GiB) == int(LEAK_LIMIT_SHARE * 16 * GiB)
    # Below the threshold on a big worker, above it on a small one.
    assert verdicts(facts(old=BASE + 600 * MiB, limit=16 * GiB)) == ["ok"]
    assert verdicts(facts(old=BASE + 600 * MiB, limit=2 * GiB)) == ["leak"]


def test_old_remaining_is_what_the_actions_left_of_old_memory() -> None:
    f = facts(old=500 * MiB, recent=100 * MiB, gc_freed=550 * MiB)
    assert f.unmanaged_after == 50 * MiB
    assert f.old_remaining == 50 * MiB
    g = facts(old=100 * MiB, recent=500 * MiB)
    assert g.old_remaining == 100 * MiB


def identity(workers: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
    return {"address": "tcp://s:8786", "workers": dict(workers)}


def worker_entry(name: str, process: int, last_seen: float) -> dict[str, Any]:
    return {
        "name": name,
        "memory_limit": GiB,
        "last_seen": last_seen,
        "metrics": {
            "memory": process,
            "managed_bytes": 10 * MiB,
            "spilled_bytes": {"memory": 0, "disk": 0},
        },
    }


async def test_sample_memory_takes_the_minimum_over_the_sampled_heartbeats() -> None:
    answers = [
        identity({"tcp://a:1": worker_entry("a", 300 * MiB, 1.0)}),
        identity({"tcp://a:1": worker_entry("a", 200 * MiB, 2.0)}),
        identity({"tcp://a:1": worker_entry("a", 500 * MiB, 3.0)}),
    ]
    calls = 0

    async def fetch() -> Mapping[str, Any]:
        # Three heartbeats, then the same answer again: as when polling faster than them.
        nonlocal calls
        calls += 1
        return answers[min(calls, len(answers)) - 1]

    poll, memory = await sample_memory(fetch, duration=0.3, interval=0.05)
    assert calls > len(answers)
    m = memory["tcp://a:1"]
    assert poll.workers["tcp://a:1"].name == "a"
    assert (m.process, m.managed, m.unmanaged_old) == (500 * MiB, 10 * MiB, 190 * MiB)
    assert m.unmanaged_recent == 300 * MiB


def test_select_workers() -> None:
    poll = decode_identity(
        identity(
            {
                "tcp://a:1": worker_entry("b", MiB, 1.0),
                "tcp://a:2": worker_entry("a", MiB, 1.0),
            }
        )
    )
    assert [w.name for w in select_workers(poll, [])] == ["a", "b"]
    assert [w.name for w in select_workers(poll, ["b", "tcp://a:1"])] == ["b"]
    with pytest.raises(ValueError, match=r"unknown worker 'c' \(known: a, b\)"):
        select_workers(poll, ["a", "c"])


def outcomes() -> list[Outcome]:
    poll = decode_identity(
        identity({"tcp://a:1": worker_entry("a", MiB, 1.0), "tcp://a:2": worker_entry("b", 1, 1)})
    )
    a, b = select_workers(poll, [])
    f = facts_from(
        a,
        MemoryBreakdown(process=400 * MiB, managed=0, unmanaged_old=400 * MiB, spilled=0),
        {
            "executing": 0,
            "malloc_trim_threshold": None,
            "gc": {"rss_before": 400 * MiB, "rss_after": 100 * MiB, "collected": 12},
            "trim": {"available": False, "reason": "not available: the C library is not glibc"},
        },
    )
    return [Outcome(a, f, assess(f)), Outcome(b, None, [], "no answer within 10 s")]


def test_json_report() -> None:
    report = json.loads(json.dumps(to_json("tcp://s:8786", 5.0, outcomes())))
    a, b = report["workers"]
    assert a["verdict"] == "garbage"
    assert a["gc"] == {
        "rss_before_bytes": 400 * MiB,
        "rss_after_bytes": 100 * MiB,
        "freed_bytes": 300 * MiB,
        "collected_objects": 12,
    }
    assert a["trim"] == {"available": False, "reason": "not available: the C library is not glibc"}
    assert a["malloc_trim_threshold"] is None
    assert a["findings"][0]["verdict"] == "garbage"
    assert b == {
        "name": "b",
        "address": "tcp://a:2",
        "error": "no answer within 10 s",
        "verdict": None,
    }


def test_table_report() -> None:
    text = render_table("tcp://s:8786", 5.0, outcomes())
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("WORKER"))
    assert header.split()[-2:] == ["MALLOC_TRIM_THRESHOLD_", "VERDICT"]
    row_a = next(line for line in lines if line.startswith("a "))
    assert row_a.split()[-3:] == ["n/a", "unset", "garbage"]
    assert "b: error: no answer within 10 s" in lines
    assert "a: malloc_trim not available: the C library is not glibc" in lines


def test_progress_only_on_a_terminal() -> None:
    out = io.StringIO()
    p = Progress(out)
    p.show("x")
    p.done()
    assert out.getvalue() == ""

    master, slave = os.openpty()  # a real terminal
    with os.fdopen(slave, "w") as tty:
        p = Progress(tty)
        p.show("diagnosing 3 worker(s): 1 done")
        p.done()
    shown = os.read(master, 4096)
    os.close(master)
    assert b"\rdiagnosing 3 worker(s): 1 done" in shown.replace(b"\x1b[K", b"")


# --- the worker actions, run in this process ------------------------------------------------


def test_measure_without_a_worker() -> None:
    m = worker_actions.measure()
    assert m["rss_bytes"] > 0 and m["executing"] is None


def test_collect_garbage_counts_unreachable_cycles() -> None:
    was = gc.isenabled()
    gc.disable()
    try:
        for _ in range(100):
            cycle: list[Any] = []
            cycle.append(cycle)
        r = worker_actions.collect_garbage()
    finally:
        if was:
            gc.enable()
    assert r["collected"] >= 100
    assert r["rss_before"] > 0 and r["rss_after"] > 0


def test_trim_runs_on_glibc() -> None:
    r = worker_actions.trim_allocator()
    assert r["available"] is True, r  # the test machines run Debian (glibc)
    assert r["rss_after"] > 0


def test_actions_import_only_the_standard_library_and_psutil() -> None:
    tree = ast.parse(Path(worker_actions.__file__).read_text())
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "no relative imports: the package is not on the worker"
            imported.add(str(node.module).split(".")[0])
    allowed = set(sys.stdlib_module_names) | {"psutil", "cloudpickle"}
    assert imported <= allowed, imported - allowed


def test_actions_travel_by_value_to_a_process_that_cannot_import_the_package() -> None:
    payload = dumps(worker_actions.diagnose_worker)  # distributed's pickler, as Client.run uses
    code = (
        "import pickle, sys, json\n"
        "sys.modules['dask_memory_exporter'] = None\n"
        "fn = pickle.loads(sys.stdin.buffer.read())\n"
        "print(json.dumps(fn()))\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], input=payload, capture_output=True, timeout=60
    )
    assert run.returncode == 0, run.stderr.decode()
    out = json.loads(run.stdout)
    assert set(out) >= {"rss_bytes", "gc", "trim", "malloc_trim_threshold"}


def test_bad_sample_time_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["diagnose", "--scheduler", "tcp://127.0.0.1:1", "--sample-time", "soon"])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["dask-memory-exporter diagnose: error: --sample-time: invalid duration 'soon'"]


def test_bad_address_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["diagnose", "--scheduler", "tcp://nohostport"]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("dask-memory-exporter diagnose: error: --scheduler: unparsable")
