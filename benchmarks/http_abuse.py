"""Hostile clients against `dask-memory-exporter serve`: idle floods and malformed requests.

The exporter runs as a real subprocess (``--mode local``, no scheduler needed) with its
open-file limit lowered to ``--nofile`` (soft and hard, so raising the soft limit cannot
help). Then:

1. **Idle flood**: ``--idle`` TCP connections that send nothing and ``--half-sent`` that send
   half a request line, more than the file limit, held for ``--hold`` seconds; meanwhile
   ``/metrics`` and ``/healthz`` are asked every 0.1 s, each with a 5 s timeout.
2. **Hostile requests**: a 1 MB header, a malformed request line, the request target ``*``,
   each ``--repeat`` times; the status of each answer is recorded.

Reported: scrapes answered and failed during the flood, the worst scrape latency, the
exporter's CPU seconds during the flood, and the log lines it wrote in each phase.

    .venv/bin/python -m benchmarks.http_abuse [--nofile 256] [--write-docs]

``--write-docs`` replaces the measured section of docs/reliability.md. The functions here
are also the tools of tests/integration/test_http_hardening.py. Not a test: nothing here
asserts anything.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import platform
import re
import resource
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "reliability.md"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def raise_own_nofile() -> None:
    """Let this process open more sockets than the exporter's limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


@dataclass
class Served:
    """A running ``serve`` subprocess; its stderr goes to ``log_path``."""

    process: subprocess.Popen[bytes]
    port: int
    log_path: Path
    scheme: str = "http"

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_lines(self) -> list[str]:
        return self.log().splitlines()


@contextlib.contextmanager
def serve(
    *args: str,
    nofile: int | tuple[int, int] | None = None,
    env: dict[str, str] | None = None,
    workdir: Path | None = None,
    wait: bool = True,
    scheme: str = "http",
    ssl_context: ssl.SSLContext | None = None,
) -> Iterator[Served]:
    """Run ``serve --mode local`` on a free loopback port; stop it (SIGTERM, SIGKILL) on exit.

    ``nofile`` lowers RLIMIT_NOFILE in the child: one number sets soft and hard, a pair sets
    (soft, hard).
    """
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="abuse-")))
        port = free_port()
        log_path = workdir / f"exporter-{port}.log"
        limits = (nofile, nofile) if isinstance(nofile, int) else nofile

        def preexec() -> None:
            if limits is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, limits)

        full_env = {**os.environ, **(env or {})}
        full_env.pop("DASK_SCHEDULER_ADDRESS", None)
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "dask_memory_exporter",
                    "serve",
                    "--mode",
                    "local",
                    "--listen",
                    f"127.0.0.1:{port}",
                    *args,
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=full_env,
                preexec_fn=preexec,  # only setrlimit, before exec
            )
        served = Served(proc, port, log_path, scheme)
        try:
            if wait:
                _wait_healthy(served, ssl_context)
            yield served
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)


def _wait_healthy(served: Served, ctx: ssl.SSLContext | None, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if served.process.poll() is not None:
            raise RuntimeError(f"exporter exited {served.process.returncode}:\n{served.log()}")
        if get(served.url + "/healthz", timeout=1, context=ctx)[0] == 200:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"exporter not healthy after {timeout}s:\n{served.log()}")
        time.sleep(0.1)


def get(
    url: str,
    headers: dict[str, str] | None = None,
    timeout: float = 5,
    context: ssl.SSLContext | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of a GET; status 0 when nothing came back."""
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=context) as r:
            return int(r.status), dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return int(e.code), dict(e.headers), e.read()
    except (OSError, urllib.error.URLError):
        return 0, {}, b""


def open_idle(port: int, n: int, first_bytes: bytes = b"") -> list[socket.socket]:
    """``n`` connections to the port that send ``first_bytes`` (maybe nothing) and then wait.

    Non-blocking connects: when the server stops accepting, the kernel's backlog fills and
    later connects stay pending instead of blocking the attacker.
    """
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        socks.append(s)
    if first_bytes:
        time.sleep(0.2)
        for s in socks:
            with contextlib.suppress(OSError):
                s.send(first_bytes)
    return socks


def closed_by_server(socks: Sequence[socket.socket]) -> int:
    """How many of ``socks`` the server has closed (EOF or reset)."""
    closed = 0
    for s in socks:
        try:
            if s.recv(1024, socket.MSG_PEEK) == b"":
                closed += 1
        except BlockingIOError:
            pass
        except OSError as e:
            if e.errno in (errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN):
                closed += 1
    return closed


@dataclass
class ProbeResult:
    answered: int = 0
    failed: int = 0
    worst_latency_s: float = 0.0
    median_latency_s: float = 0.0
    statuses: dict[int, int] = field(default_factory=dict)


def probe(base_url: str, duration: float, interval: float = 0.1) -> ProbeResult:
    """Ask /metrics and /healthz in turn for ``duration`` seconds."""
    result = ProbeResult()
    deadline = time.monotonic() + duration
    paths = ("/metrics", "/healthz")
    latencies = []
    i = 0
    while time.monotonic() < deadline:
        t0 = time.monotonic()
        status, _, _ = get(base_url + paths[i % 2], timeout=5)
        dt = time.monotonic() - t0
        i += 1
        result.statuses[status] = result.statuses.get(status, 0) + 1
        if status == 200:
            result.answered += 1
            result.worst_latency_s = max(result.worst_latency_s, dt)
            latencies.append(dt)
        else:
            result.failed += 1
        time.sleep(interval)
    if latencies:
        result.median_latency_s = statistics.median(latencies)
    return result


HOSTILE: dict[str, bytes] = {
    "1 MB header": b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 2**20 + b"\r\n\r\n",
    "malformed request line": b"GET\x00/metrics HTTP/1.1 extra\r\nHost: x\r\n\r\n",
    "request target *": b"GET * HTTP/1.1\r\nHost: x\r\n\r\n",
    "OPTIONS *": b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n",
    "not HTTP": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64,
}


def raw_request(port: int, data: bytes, timeout: float = 5) -> int:
    """Send ``data`` as is; return the status of the answer (0: none, connection reset)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        received = b""
        try:
            for i in range(0, len(data), 65536):
                s.sendall(data[i : i + 65536])
        except OSError:
            pass  # the server answered and closed before reading everything
        with contextlib.suppress(OSError):
            while b"\r\n" not in received:
                chunk = s.recv(4096)
                if not chunk:
                    break
                received += chunk
    m = re.match(rb"HTTP/1\.[01] (\d{3})", received)
    return int(m.group(1)) if m else 0


@dataclass
class Report:
    nofile: int
    idle: int
    half_sent: int
    hold_s: float
    probe: ProbeResult
    closed_after_timeout: int
    cpu_s: float
    log_lines_flood: int
    hostile_statuses: dict[str, list[int]]
    log_lines_hostile: int
    tracebacks: int
    machine: str = ""


def run(nofile: int, idle: int, half_sent: int, hold: float, repeat: int) -> Report:
    raise_own_nofile()
    with serve("--http-idle-timeout", f"{hold + 5}s", nofile=nofile) as ex:
        ps = psutil.Process(ex.process.pid)
        lines0 = len(ex.log_lines())
        cpu0 = sum(ps.cpu_times()[:2])
        socks = open_idle(ex.port, idle) + open_idle(
            ex.port, half_sent, b"GET /metrics HTTP/1.1\r\nHost: x\r\n"
        )
        try:
            result = probe(ex.url, hold)
            cpu = sum(ps.cpu_times()[:2]) - cpu0
            lines_flood = len(ex.log_lines()) - lines0
            time.sleep(6)  # past the idle timeout
            closed = closed_by_server(socks)
        finally:
            for s in socks:
                s.close()
        lines1 = len(ex.log_lines())
        statuses = {k: [raw_request(ex.port, v) for _ in range(repeat)] for k, v in HOSTILE.items()}
        time.sleep(0.5)
        log = ex.log_lines()
    return Report(
        nofile=nofile,
        idle=idle,
        half_sent=half_sent,
        hold_s=hold,
        probe=result,
        closed_after_timeout=closed,
        cpu_s=round(cpu, 3),
        log_lines_flood=lines_flood,
        hostile_statuses=statuses,
        log_lines_hostile=len(log) - lines1,
        tracebacks=sum("Traceback" in line for line in log),
        machine=f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
    )


def _markdown(r: Report) -> str:
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    rows = "\n".join(
        f"| {k} | {', '.join(map(str, sorted(set(v))))} ({len(v)} requests) |"
        for k, v in r.hostile_statuses.items()
    )
    return f"""<!-- http-abuse:start -->
Measured {when} with `.venv/bin/python -m benchmarks.http_abuse`
({r.machine}, shared with other jobs): the exporter's open-file limit {r.nofile} (soft and
hard), {r.idle} idle and {r.half_sent} half-sent connections held {r.hold_s:g} s, `/metrics`
and `/healthz` asked every 0.1 s meanwhile (5 s timeout each).

| figure | value |
| --- | --- |
| scrapes answered during the flood | {r.probe.answered} of {r.probe.answered + r.probe.failed} |
| median / worst scrape latency during the flood | \
{r.probe.median_latency_s * 1000:.0f} ms / {r.probe.worst_latency_s * 1000:.0f} ms |
| exporter CPU during the flood | {r.cpu_s:.2f} s in {r.hold_s:g} s |
| log lines written during the flood | {r.log_lines_flood} |
| flood connections closed by the server {r.hold_s + 6:g} s after the flood began |\
 {r.closed_after_timeout} of {r.idle + r.half_sent} |
| log lines for all hostile requests below | {r.log_lines_hostile} |
| tracebacks in the whole log | {r.tracebacks} |

| hostile request | status answered |
| --- | --- |
{rows}
<!-- http-abuse:end -->"""


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--nofile", type=int, default=256)
    p.add_argument("--idle", type=int, default=300)
    p.add_argument("--half-sent", type=int, default=100)
    p.add_argument("--hold", type=float, default=10.0)
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--write-docs", action="store_true")
    a = p.parse_args(argv)
    report = run(a.nofile, a.idle, a.half_sent, a.hold, a.repeat)
    print(json.dumps(asdict(report), indent=2))
    if a.write_docs:
        text = DOC.read_text()
        new = re.sub(
            r"<!-- http-abuse:start -->.*<!-- http-abuse:end -->",
            lambda _: _markdown(report),
            text,
            flags=re.S,
        )
        DOC.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
