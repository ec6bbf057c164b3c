"""A worker's event loop blocked by a task holding the GIL: who still reports its memory?

A LocalCluster of two worker processes on loopback (worker dashboards on), and
`dask-memory-exporter serve --mode both` as a separate process beside them. One worker runs a
task that holds the GIL for about 12 s in a single C call while allocating memory step by
step (``hold_gil_and_grow``). Every 0.5 s, before and during the stall, the benchmark asks at
once, each with a 1 s timeout:

- Dask's own worker ``/metrics`` (the worker's dashboard port, from the scheduler identity's
  ``services["dashboard"]``): answered or not, latency;
- the exporter's ``/metrics``: answered or not, latency, ``dask_memory_worker_rss_bytes`` and
  ``dask_memory_worker_heartbeat_age_seconds`` of the stalled worker;
- the scheduler's heartbeat figure for that worker (identity ``metrics.memory``);
- the true RSS, read by the benchmark with psutil (the reference).

    .venv/bin/python -m benchmarks.blocked_event_loop [--stall 12] [--write-docs]

``--write-docs`` replaces the measured section of docs/sidecar.md. Not a test: nothing here
asserts anything.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import psutil
from distributed import Client, LocalCluster

MIB = 2**20
DOCS = Path(__file__).resolve().parent.parent / "docs" / "sidecar.md"
START, END = "<!-- benchmark:start -->", "<!-- benchmark:end -->"


def hold_gil_and_grow(seconds: float, step: int) -> int:
    """Hold the GIL for about ``seconds`` in one C call while allocating ``step`` bytes at a time.

    ``list(zip(map(pattern.match, ...), map(b"x".__mul__, ...)))`` runs entirely in C: each
    element is a catastrophically backtracking regex (the GIL is never released) followed by a
    freshly written ``step``-byte object, so RSS climbs all through the stall while the event
    loop, heartbeats and the worker's own /metrics are frozen. Runs on a worker.
    """
    pattern = re.compile(r"(a+)+b")
    size = 16
    while True:  # calibrate: a match of about 50 ms
        started = time.perf_counter()
        pattern.match("a" * size)
        if time.perf_counter() - started > 0.05 or size >= 30:
            break
        size += 1
    text = "a" * (size + 2)  # about 4x that per step
    fastest = float("inf")
    for _ in range(2):  # timed uncontended (the faster of two: the host is shared)
        started = time.perf_counter()
        pattern.match(text)
        fastest = min(fastest, time.perf_counter() - started)
    steps = max(1, round(seconds / fastest))  # contention only makes the stall longer
    held = list(
        zip(
            map(pattern.match, itertools.repeat(text, steps)),
            map(b"x".__mul__, itertools.repeat(step, steps)),
            strict=True,
        )
    )
    return len(held)


@dataclass
class Sample:
    phase: str
    t: float
    worker_ok: bool
    worker_ms: float | None
    exporter_ok: bool
    exporter_ms: float | None
    exporter_rss: float | None
    heartbeat_age: float | None
    heartbeat_process: int
    scheduler_age: float
    true_rss: int


@dataclass
class Phase:
    phase: str
    samples: int
    worker_answered: int
    worker_median_ms: float | None
    exporter_answered: int
    exporter_median_ms: float | None
    exporter_max_ms: float | None
    max_heartbeat_age: float | None
    true_rss_mib: float
    exporter_rss_mib: float | None
    heartbeat_process_mib: float
    exporter_error_mib: float | None = field(default=None)
    heartbeat_error_mib: float = 0.0
    exporter_max_lag_mib: float | None = None
    """Largest (true RSS - exporter RSS) over the phase: how far the exporter trails."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _fetch(url: str, timeout: float) -> tuple[bool, float | None, str]:
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            body = resp.read().decode()
    except OSError:
        return False, None, ""
    return True, (time.perf_counter() - started) * 1000, body


def _series(body: str, metric: str, worker: str) -> float | None:
    m = re.search(rf'^{metric}\{{[^}}]*worker="{re.escape(worker)}"[^}}]*\}} (\S+)$', body, re.M)
    return float(m.group(1)) if m else None


def _summary(phase: str, samples: list[Sample]) -> Phase:
    worker_ms = [s.worker_ms for s in samples if s.worker_ms is not None]
    exporter_ms = [s.exporter_ms for s in samples if s.exporter_ms is not None]
    ages = [s.heartbeat_age for s in samples if s.heartbeat_age is not None]
    if not samples:
        raise RuntimeError(f"no samples in phase {phase}")
    peak = max(samples, key=lambda s: s.true_rss)
    lags = [
        s.true_rss - s.exporter_rss for s in samples if s.exporter_rss is not None
    ]  # the stall's end: memory at its highest
    return Phase(
        phase=phase,
        samples=len(samples),
        worker_answered=sum(s.worker_ok for s in samples),
        worker_median_ms=round(statistics.median(worker_ms), 1) if worker_ms else None,
        exporter_answered=sum(s.exporter_ok for s in samples),
        exporter_median_ms=round(statistics.median(exporter_ms), 1) if exporter_ms else None,
        exporter_max_ms=round(max(exporter_ms), 1) if exporter_ms else None,
        max_heartbeat_age=round(max(ages), 1) if ages else None,
        true_rss_mib=round(peak.true_rss / MIB, 1),
        exporter_rss_mib=round(peak.exporter_rss / MIB, 1) if peak.exporter_rss else None,
        heartbeat_process_mib=round(peak.heartbeat_process / MIB, 1),
        exporter_error_mib=(
            round((peak.exporter_rss - peak.true_rss) / MIB, 1) if peak.exporter_rss else None
        ),
        heartbeat_error_mib=round((peak.heartbeat_process - peak.true_rss) / MIB, 1),
        exporter_max_lag_mib=round(max(lags) / MIB, 1) if lags else None,
    )


def run(stall: float, step: int) -> dict[str, Any]:
    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            memory_limit="4GiB",
            host="127.0.0.1",
            scheduler_port=0,
            dashboard_address="127.0.0.1:0",
            worker_dashboard_address="127.0.0.1:0",
        ) as cluster,
        Client(cluster) as client,
    ):
        client.wait_for_workers(2, timeout=60)
        scheduler: Any = cluster.scheduler
        identity = scheduler.identity(n_workers=-1)["workers"]
        addr = sorted(identity)[0]
        dashboard = identity[addr]["services"]["dashboard"]
        worker_url = f"http://127.0.0.1:{dashboard}/metrics"
        pid = client.run(os.getpid, workers=[addr])[addr]
        port = _free_port()
        exporter = subprocess.Popen(
            [sys.executable, "-m", "dask_memory_exporter", "serve", "--mode", "both",
             "--scheduler", cluster.scheduler_address, "--listen", f"127.0.0.1:{port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        exporter_url = f"http://127.0.0.1:{port}/metrics"
        try:
            deadline = time.monotonic() + 60
            while True:
                ok, _, body = _fetch(exporter_url, 1.0)
                if ok and _series(body, "dask_memory_worker_rss_bytes", addr) is not None:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError("the exporter did not report the worker's RSS")
                time.sleep(0.2)
            samples = _sample_run(
                client, scheduler, addr, pid, worker_url, exporter_url, stall, step
            )
        finally:
            exporter.terminate()
            exporter.wait(timeout=20)
    idle = [s for s in samples if s.phase == "idle"]
    stalled = [s for s in samples if s.phase == "stall"]
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{psutil.cpu_count()} cores, {platform.machine()}, Python "
        f"{platform.python_version()}",
        "stall_seconds": stall,
        "phases": [asdict(_summary("idle", idle)), asdict(_summary("stall", stalled))],
    }


def _sample_run(
    client: Client,
    scheduler: Any,
    addr: str,
    pid: int,
    worker_url: str,
    exporter_url: str,
    stall: float,
    step: int,
) -> list[Sample]:
    samples: list[Sample] = []
    proc = psutil.Process(pid)
    pool = ThreadPoolExecutor(2)

    def sample(phase: str) -> None:
        def exporter_and_truth() -> tuple[tuple[bool, float | None, str], int]:
            # The reference RSS is read as soon as the exporter has answered.
            return _fetch(exporter_url, 1.0), int(proc.memory_info().rss)

        w = pool.submit(_fetch, worker_url, 1.0)
        e = pool.submit(exporter_and_truth)
        worker_ok, worker_ms, _ = w.result()
        (exporter_ok, exporter_ms, body), true_rss = e.result()
        ws = scheduler.workers.get(addr)
        samples.append(
            Sample(
                phase=phase,
                t=time.monotonic(),
                worker_ok=worker_ok,
                worker_ms=worker_ms,
                exporter_ok=exporter_ok,
                exporter_ms=exporter_ms,
                exporter_rss=_series(body, "dask_memory_worker_rss_bytes", addr),
                heartbeat_age=_series(body, "dask_memory_worker_heartbeat_age_seconds", addr),
                heartbeat_process=int(ws.metrics["memory"]) if ws else 0,
                scheduler_age=time.time() - ws.last_seen if ws else 0.0,
                true_rss=true_rss,
            )
        )

    end = time.monotonic() + 3
    while time.monotonic() < end:
        sample("idle")
        time.sleep(0.5)
    fut = client.submit(
        hold_gil_and_grow, stall, step, workers=[addr], pure=False, allow_other_workers=False
    )
    # The stall starts once the task is running: its heartbeats stop, so wait for age > 1 s.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        time.sleep(0.25)
        ws = scheduler.workers.get(addr)
        if ws is not None and time.time() - ws.last_seen > 1.0:
            break
    while not fut.done():
        sample("stall")
        time.sleep(0.5)
    fut.result()
    pool.shutdown()
    # Samples taken after the worker's loop came back are not part of the stall.
    return [s for s in samples if s.phase == "idle" or s.scheduler_age >= 1.0]


def table(result: dict[str, Any]) -> str:
    def fmt(v: Any, unit: str = "") -> str:
        return "—" if v is None else f"{v}{unit}"

    rows = [
        "| | idle | GIL held |",
        "|---|---|---|",
    ]
    idle, stall = result["phases"]
    lines = [
        ("samples (every 0.5 s, 1 s timeout)", "samples", ""),
        ("Dask worker /metrics answered", "worker_answered", ""),
        ("Dask worker /metrics median latency (answered)", "worker_median_ms", " ms"),
        ("exporter /metrics answered", "exporter_answered", ""),
        ("exporter /metrics median latency", "exporter_median_ms", " ms"),
        ("exporter /metrics max latency", "exporter_max_ms", " ms"),
        ("max heartbeat age (exporter)", "max_heartbeat_age", " s"),
        ("true RSS at the peak (psutil)", "true_rss_mib", " MiB"),
        ("exporter `dask_memory_worker_rss_bytes`", "exporter_rss_mib", " MiB"),
        ("heartbeat `metrics.memory` (scheduler)", "heartbeat_process_mib", " MiB"),
        ("exporter error vs true RSS", "exporter_error_mib", " MiB"),
        ("heartbeat error vs true RSS", "heartbeat_error_mib", " MiB"),
        ("exporter's largest lag behind true RSS", "exporter_max_lag_mib", " MiB"),
    ]
    for label, key, unit in lines:
        a, b = idle[key], stall[key]
        if key in ("worker_answered", "exporter_answered"):
            a, b = f"{a}/{idle['samples']}", f"{b}/{stall['samples']}"
        rows.append(f"| {label} | {fmt(a, unit)} | {fmt(b, unit)} |")
    return "\n".join(rows)


def write_docs(result: dict[str, Any]) -> None:
    text = DOCS.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{DOCS} lacks the {START} ... {END} markers")
    body = (
        f"{START}\nMeasured {result['date']} on {result['machine']} (shared with other jobs), "
        f"distributed {_version('distributed')}, one stall of about "
        f"{result['stall_seconds']:.0f} s allocating step by step:\n\n{table(result)}\n{END}"
    )
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    DOCS.write_text(head + body + tail)


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stall", type=float, default=12.0, help="seconds the GIL is held")
    parser.add_argument("--step-mib", type=int, default=6, help="MiB allocated per step")
    parser.add_argument("--write-docs", action="store_true", help="update docs/sidecar.md")
    args = parser.parse_args(argv)
    result = run(args.stall, args.step_mib * MIB)
    print(table(result))
    print(json.dumps(result))
    if args.write_docs:
        write_docs(result)


if __name__ == "__main__":
    main()
