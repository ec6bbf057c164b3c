"""Footprint of `dask-memory-exporter serve`: RSS and CPU against a real LocalCluster.

Runs the installed console script as a separate process against a LocalCluster on loopback,
scrapes its /metrics at a fixed rate (as Prometheus would, faster than the usual 15-30 s), and
samples the exporter's resident memory and CPU time with psutil. The figures size the
Kubernetes requests and limits (docs/resources.md).

    .venv/bin/python benchmarks/resources.py [--duration 60] [--scrape-interval 1]

Two clusters by default: 4 worker processes, and 100 in-process workers (the exporter's cost
grows with the number of workers it reports, not with where they run).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass

import psutil
from distributed import LocalCluster

MIB = 1024 * 1024


@dataclass(frozen=True)
class Result:
    """One run: the cluster's size and the exporter's measured footprint."""

    workers: int
    processes: bool
    seconds: float
    startup_cpu_seconds: float
    scrapes: int
    rss_start_mib: float
    rss_peak_mib: float
    rss_end_mib: float
    cpu_avg_millicores: float
    cpu_peak_millicores: float
    scrape_median_ms: float
    metrics_bytes: int


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as resp:
        body: bytes = resp.read()
        return body


def _wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exporter exited with {proc.returncode}")
        try:
            _get(url)
            return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"{url} not ready within {timeout} s")


def measure(workers: int, processes: bool, duration: float, scrape_interval: float) -> Result:
    """Start a cluster and the exporter, scrape for ``duration`` seconds, return the figures."""
    exe = shutil.which("dask-memory-exporter", path=os.path.dirname(sys.executable))
    if exe is None:
        raise SystemExit("dask-memory-exporter is not installed in this environment")
    with LocalCluster(
        n_workers=workers,
        threads_per_worker=1,
        processes=processes,
        protocol="tcp://",  # in-process workers would default to inproc://, unreachable
        host="127.0.0.1",
        scheduler_port=0,
        dashboard_address="127.0.0.1:0",
        worker_dashboard_address="127.0.0.1:0",
        memory_limit="256MiB",
    ) as cluster:
        cluster.wait_for_workers(workers, timeout=120)
        port = _free_port()
        base = f"http://127.0.0.1:{port}"
        env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
        cmd = [exe, "serve", "--scheduler", cluster.scheduler_address]
        cmd += ["--listen", f"127.0.0.1:{port}", "--log-level", "WARNING"]
        proc = subprocess.Popen(cmd, env=env)
        try:
            _wait_ready(f"{base}/readyz", proc)
            ps = psutil.Process(proc.pid)
            rss_start = ps.memory_info().rss
            rss_peak = rss_start
            cpu_prev = sum(ps.cpu_times()[:2])
            startup_cpu = cpu_prev  # CPU time spent until the first successful poll
            t_prev = time.monotonic()
            started, cpu_start = t_prev, cpu_prev
            cpu_samples: list[float] = []
            latencies: list[float] = []
            size = 0
            while time.monotonic() - started < duration:
                t0 = time.perf_counter()
                size = len(_get(f"{base}/metrics"))
                latencies.append((time.perf_counter() - t0) * 1000)
                time.sleep(max(0.0, scrape_interval - (time.perf_counter() - t0)))
                now, cpu = time.monotonic(), sum(ps.cpu_times()[:2])
                cpu_samples.append((cpu - cpu_prev) / (now - t_prev) * 1000)
                cpu_prev, t_prev = cpu, now
                rss_peak = max(rss_peak, ps.memory_info().rss)
            elapsed = time.monotonic() - started
            return Result(
                workers=workers,
                processes=processes,
                seconds=round(elapsed, 1),
                startup_cpu_seconds=round(startup_cpu, 2),
                scrapes=len(latencies),
                rss_start_mib=round(rss_start / MIB, 1),
                rss_peak_mib=round(rss_peak / MIB, 1),
                rss_end_mib=round(ps.memory_info().rss / MIB, 1),
                cpu_avg_millicores=round((cpu_prev - cpu_start) / elapsed * 1000, 1),
                cpu_peak_millicores=round(max(cpu_samples), 1),
                scrape_median_ms=round(statistics.median(latencies), 2),
                metrics_bytes=size,
            )
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=60.0, help="seconds per cluster")
    parser.add_argument("--scrape-interval", type=float, default=1.0, help="seconds")
    parser.add_argument(
        "--clusters",
        default="4:processes,100:threads",
        help="comma-separated WORKERS:processes|threads (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    results = []
    for spec in args.clusters.split(","):
        n, kind = spec.split(":")
        result = measure(int(n), kind == "processes", args.duration, args.scrape_interval)
        print(json.dumps(asdict(result)), flush=True)
        results.append(result)
    print()
    print(
        "| workers | startup CPU (s) | RSS start / peak (MiB) "
        "| CPU avg / peak (millicores) | scrape median (ms) | /metrics (bytes) |"
    )
    print("|---|---|---|---|---|---|")
    for r in results:
        kind = "processes" if r.processes else "in-process"
        print(
            f"| {r.workers} ({kind}) | {r.startup_cpu_seconds} "
            f"| {r.rss_start_mib} / {r.rss_peak_mib} "
            f"| {r.cpu_avg_millicores} / {r.cpu_peak_millicores} "
            f"| {r.scrape_median_ms} | {r.metrics_bytes} |"
        )


if __name__ == "__main__":
    main()
