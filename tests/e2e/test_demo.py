"""The README's first command: the demo, as a user runs it, with the default settings.

Done when: within a minute of starting, /metrics shows the leaking worker's unmanaged (old)
memory rising while the spilling worker shows managed and spilled bytes; Ctrl-C stops it all.
The Dask dashboard link it prints works, and Ctrl-C in a terminal stops it without a traceback.
"""

from __future__ import annotations

import os
import pty
import re
import select
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


class Terminal:
    """The demo on a real pseudo-terminal, in its own session, as a shell runs it."""

    def __init__(self, port: int) -> None:
        master, slave = pty.openpty()
        self.master = master
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dask_memory_exporter", "demo", "--listen", f"127.0.0.1:{port}"],
            stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
        )  # fmt: skip
        os.close(slave)
        self.output = b""

    def read_until(self, needle: bytes, timeout: float) -> bool:
        """Read output until ``needle`` appears (True) or the timeout or EOF (False)."""
        deadline = time.monotonic() + timeout
        while needle not in self.output and time.monotonic() < deadline:
            ready, _, _ = select.select([self.master], [], [], 0.5)
            if not ready:
                continue
            try:
                chunk = os.read(self.master, 65536)
            except OSError:  # EIO: every process holding the terminal has exited
                return needle in self.output
            if not chunk:
                break
            self.output += chunk
        return needle in self.output

    def ctrl_c(self) -> None:
        """What the terminal does on Ctrl-C: SIGINT to the whole foreground process group."""
        os.killpg(self.proc.pid, signal.SIGINT)

    def text(self) -> str:
        return self.output.decode(errors="replace")


def test_demo_dashboard_link_works_and_ctrl_c_stops_quietly() -> None:
    """The printed Dask dashboard link serves Dask's real page (bokeh is installed), and
    Ctrl-C on a terminal, which reaches the worker processes too, ends with no traceback."""
    term = Terminal(free_port())
    children: list[psutil.Process] = []
    try:
        assert term.read_until(b"press Ctrl-C to stop", 90), term.text()
        children = psutil.Process(term.proc.pid).children(recursive=True)
        link = re.search(r"dask dashboard: (\S+)", term.text())
        assert link is not None, term.text()
        with urllib.request.urlopen(link.group(1), timeout=30) as r:
            page = r.read().decode()
        assert "Dask needs" not in page
        assert "Dask Diagnostic UI" in page, page[:500]
        # the memory plot the landing page mirrors is a live bokeh document
        memory = link.group(1).replace("/status", "/individual-workers-memory")
        with urllib.request.urlopen(memory, timeout=30) as r:
            assert "Bokeh" in r.read().decode()
        term.ctrl_c()
        assert term.proc.wait(timeout=60) == 0, term.text()
        term.read_until(b"\0", 5)  # drain what is left
    finally:
        if term.proc.poll() is None:
            os.killpg(term.proc.pid, signal.SIGKILL)
            term.proc.wait(timeout=10)
        os.close(term.master)
    out = term.text()
    assert "stopping" in out
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out
    assert "ERROR" not in out, out
    _, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, f"left running: {alive}"
