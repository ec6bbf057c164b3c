"""The README's first command: the demo, as a user runs it, with the default settings.

Done when: within a minute of starting, /metrics shows the leaking worker's unmanaged (old)
memory rising while the spilling worker shows managed and spilled bytes; Ctrl-C stops it all.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import urllib.request

import psutil

from dask_memory_exporter import names as n
from tests.support.live import by_worker_name, free_port, parse

MiB = 2**20


def scrape(url: str) -> dict[str, dict[str, float]]:
    with urllib.request.urlopen(url, timeout=5) as r:
        s = parse(r.read().decode())
    return {m: by_worker_name(s, m) for m in n.WORKER_FAMILIES}


def test_demo_shows_leak_and_spill_within_a_minute() -> None:
    port = free_port()
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "dask_memory_exporter", "demo", "--listen", f"127.0.0.1:{port}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    children: list[psutil.Process] = []
    try:
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("exporter: "):
                break
        url = lines[-1].split(" ", 1)[1].strip()
        assert url == f"http://127.0.0.1:{port}/metrics", lines
        children = psutil.Process(proc.pid).children(recursive=True)
        assert len(children) >= 3  # three worker processes (and their nannies' helpers)

        first_old: float | None = None
        ok = False
        while time.monotonic() - started < 60:
            m = scrape(url)
            old = m[n.WORKER_UNMANAGED_BYTES].get("leak")
            if old is not None and first_old is None:
                first_old = old
            if (
                first_old is not None
                and old is not None
                and old > first_old + 40 * MiB
                and m[n.WORKER_MANAGED_BYTES].get("spill", 0) > 50 * MiB
                and m[n.WORKER_SPILLED_BYTES].get("spill", 0) > 50 * MiB
                and m[n.WORKER_PROCESS_BYTES].get("idle", 0) > 0
            ):
                ok = True
                break
            time.sleep(1)
        assert ok, f"after 60 s: {m}"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 0, out[-2000:]
    assert "Traceback" not in out
    _, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, f"left running: {alive}"
