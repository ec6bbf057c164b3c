"""Faults and abuse, each with the figure docs/reliability.md records (printed with ``-s``).

Not repeated here (already in the suite): one scheduler restart, a hung scheduler and an
unreachable one (test_faults.py); idle and half-sent connections beyond the file limit, idle
timeouts, the 1 MB header, malformed request lines and ``*`` (test_http_hardening.py).

- the scheduler killed (SIGKILL) and restarted 10 times, then stopped with SIGSTOP: a real
  ``dask scheduler`` process, scraped all along;
- worker churn on a real in-process scheduler;
- 200 concurrent scrapes of 1,000 workers;
- oversized requests (a 1 MB target, 10,000 headers, a 100 MB body, an endless chunked body)
  against the real ``serve`` process;
- malformed ``identity`` answers from a stand-in scheduler built on distributed's own comm
  ``Server``: the one fault here that is not produced for real, because a real scheduler only
  sends what its workers' heartbeats carry. Its worker entries hold just the fields the
  exporter reads (a real entry's others are ignored).
"""

from __future__ import annotations

import asyncio
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
import pytest_asyncio
from distributed import Scheduler, Worker
from distributed.core import Server

from benchmarks.http_abuse import get, raw_request, serve
from dask_memory_exporter import names as n
from tests.support.live import (
    Samples,
    by_worker_name,
    free_port,
    parse,
    scalar,
    serve_exporter,
    source_errors,
)

MiB = 2**20
BIN = Path(sys.executable).parent


# --- a stand-in scheduler on distributed's comm ---------
def entry(name: str, memory: float = 200 * MiB, **override: Any) -> dict[str, Any]:
    """A worker entry of ``identity()["workers"]`` with the fields the exporter reads."""
    e: dict[str, Any] = {
        "type": "Worker",
        "name": name,
        "host": "127.0.0.1",
        "nthreads": 2,
        "memory_limit": 1024 * MiB,
        "status": "running",
        "nanny": None,
        "last_seen": time.time(),
        "metrics": {
            "memory": memory,
            "managed_bytes": 50 * MiB,
            "spilled_bytes": {"memory": 0, "disk": 0},
            "task_counts": {},
        },
    }
    e.update(override)
    return e


class StandIn:
    """An ``identity`` handler whose answer each test sets (a value or a coroutine)."""

    def __init__(self) -> None:
        self.answer: Callable[[], Any] = lambda: {"workers": {}}
        self.server = Server({"identity": self.identity})

    async def identity(self, comm: Any = None, n_workers: int = -1) -> Any:
        result = self.answer()
        if asyncio.iscoroutine(result):
            result = await result
        return result

    def workers(self, workers: dict[Any, Any]) -> None:
        self.answer = lambda: {"type": "Scheduler", "address": "tcp://stand-in", "workers": workers}


@pytest_asyncio.fixture
async def stand_in() -> AsyncIterator[StandIn]:
    s = StandIn()
    await s.server.listen("tcp://127.0.0.1:0")
    try:
        yield s
    finally:
        s.server.stop()


GOOD = {"tcp://127.0.0.1:1001": entry("good-1"), "tcp://127.0.0.1:1002": entry("good-2")}


def _broken(**metrics: Any) -> dict[str, Any]:
    e = entry("broken")
    e["metrics"] = {**e["metrics"], **metrics}
    return e


MALFORMED: dict[str, Any] = {
    "no metrics": {k: v for k, v in entry("broken").items() if k != "metrics"},
    "no memory": {**entry("broken"), "metrics": {"managed_bytes": 0}},
    "metrics not a mapping": entry("broken", metrics=[1, 2, 3]),
    "entry not a mapping": "a string",
    "entry None": None,
    "memory a string": _broken(memory="lots"),
    "memory True": _broken(memory=True),
    "spilled_bytes a list": _broken(spilled_bytes=[0, 0]),
    "nthreads a string": entry("broken", nthreads="two"),
    "memory NaN": _broken(memory=math.nan),
    "memory infinity": _broken(memory=math.inf),
    "nthreads infinity": entry("broken", nthreads=math.inf),
    "last_seen -infinity": entry("broken", last_seen=-math.inf),
    "last_seen NaN": entry("broken", last_seen=math.nan),
    "memory negative": _broken(memory=-1),
    "limit negative": entry("broken", memory_limit=-300_000_000),
    "managed negative": _broken(managed_bytes=-5),
}


async def test_malformed_worker_entries_are_skipped_and_counted(stand_in: StandIn) -> None:
    """Each kind of broken entry, all in one answer beside two good workers: the good ones are
    exported, every broken one is skipped and counted, the poll succeeds."""
    broken = {f"tcp://10.0.0.{i}:1": e for i, e in enumerate(MALFORMED.values())}
    stand_in.workers({**GOOD, **broken})
    async with serve_exporter(scheduler=stand_in.server.address, timeout=5.0) as ex:
        s = await ex.wait_for(lambda s: scalar(s, n.SCHEDULER_UP) == 1, what="a good poll")
    assert set(by_worker_name(s, n.WORKER_PROCESS_BYTES)) == {"good-1", "good-2"}
    assert scalar(s, n.EXPORTER_SKIPPED_WORKERS) == len(MALFORMED)
    assert scalar(s, n.SCHEDULER_WORKERS) == len(MALFORMED) + 2
    assert not any(labels and dict(labels).get("worker_name") == "broken" for _, labels in s), (
        "a broken entry was exported"
    )
    print(f"{len(MALFORMED)} kinds of broken entry skipped and counted, 2 good ones exported")


@pytest.mark.parametrize(
    "answer",
    [None, "a string", {"no": "workers"}, {"workers": ["a", "list"]}, {"workers": None}],
    ids=["None", "string", "no workers key", "workers a list", "workers None"],
)
async def test_malformed_identity_answer_is_a_decode_error(stand_in: StandIn, answer: Any) -> None:
    stand_in.answer = lambda: answer
    async with serve_exporter(scheduler=stand_in.server.address, max_backoff=1.0) as ex:
        s = await ex.wait_for(
            lambda s: source_errors(s, reason="decode") >= 1, what="a decode error"
        )
        assert scalar(s, n.SCHEDULER_UP) == 0
        assert (await ex.get("/metrics"))[0] == 200


HOSTILE_NAMES = [
    'quote"quote',
    "new\nline",
    "back\\slash",
    '"} injected_metric 1\n# TYPE x gauge',
    "<script>alert(1)</script>",
    "ünïcødé 名前 🙂",
    "x" * 10_000,
    "",
]


async def test_hostile_names_are_escaped_everywhere(stand_in: StandIn) -> None:
    """Names and addresses that try to break the exposition or the landing page round-trip
    exactly through the Prometheus parser, in both formats, and are escaped in HTML."""
    workers = {
        f'tcp://127.0.0.1:{2000 + i}/"\n{i}': entry(name) for i, name in enumerate(HOSTILE_NAMES)
    }
    stand_in.workers(workers)
    async with serve_exporter(scheduler=stand_in.server.address) as ex:
        s = await ex.wait_for(lambda s: scalar(s, n.SCHEDULER_UP) == 1, what="a good poll")
        got = {dict(labels)["worker"]: dict(labels)["worker_name"]
               for name, labels in s if name == n.WORKER_PROCESS_BYTES}  # fmt: skip
        assert got == {addr: e["name"] for addr, e in workers.items()}
        status, _, om = await ex.get(
            "/metrics", Accept="application/openmetrics-text; version=1.0.0"
        )
        assert status == 200
        om_names = {
            dict(labels)["worker_name"]
            for name, labels in parse(om.decode())
            if name == n.WORKER_PROCESS_BYTES
        }
        assert om_names == set(HOSTILE_NAMES)
        assert ("injected_metric", ()) not in s
        _, _, page = await ex.get("/")
        assert b"<script>alert(1)</script>" not in page
        assert b"&lt;script&gt;alert(1)&lt;/script&gt;" in page


async def test_ten_thousand_workers(stand_in: StandIn) -> None:
    many = {f"tcp://10.{i // 250}.0.{i % 250}:4000": entry(f"w{i}") for i in range(10_000)}
    stand_in.workers(many)
    async with serve_exporter(scheduler=stand_in.server.address, timeout=30.0) as ex:
        s = await ex.wait_for(
            lambda s: scalar(s, n.SCHEDULER_WORKERS) == 10_000, timeout=120, what="10,000"
        )
        _, _, body = await ex.get("/metrics")
    assert len(by_worker_name(s, n.WORKER_PROCESS_BYTES)) == 10_000
    assert scalar(s, n.EXPORTER_SKIPPED_WORKERS) == 0
    print(
        f"10,000 workers: poll {scalar(s, n.EXPORTER_POLL_DURATION_SECONDS):.2f} s, "
        f"scrape {len(body) / MiB:.1f} MiB"
    )


async def test_a_handler_that_raises_then_one_that_hangs(stand_in: StandIn) -> None:
    """A handler error is reported at once with reason handler; a hung handler with reason
    timeout after --timeout; /metrics keeps answering with the last workers meanwhile."""
    stand_in.workers(GOOD)
    async with serve_exporter(
        scheduler=stand_in.server.address, timeout=2.0, max_backoff=1.0, stale_after=600
    ) as ex:
        await ex.wait_for(lambda s: scalar(s, n.SCHEDULER_UP) == 1, what="a good poll")

        def boom() -> Any:
            raise RuntimeError("the handler broke")

        stand_in.answer = boom
        s = await ex.wait_for(
            lambda s: source_errors(s, reason="handler") >= 1, what="a handler error"
        )
        assert scalar(s, n.SCHEDULER_UP) == 0
        assert set(by_worker_name(s, n.WORKER_PROCESS_BYTES)) == {"good-1", "good-2"}

        forever = asyncio.Event()
        stand_in.answer = forever.wait
        s = await ex.wait_for(
            lambda s: source_errors(s, reason="timeout") >= 1, timeout=60, what="a timeout"
        )
        statuses = []
        for _ in range(20):
            statuses.append((await ex.get("/metrics"))[0])
        assert set(statuses) == {200}
        forever.set()
        stand_in.workers(GOOD)
        await ex.wait_for(lambda s: scalar(s, n.SCHEDULER_UP) == 1, timeout=60, what="recovery")


# --- the real scheduler killed 10 times, then stopped ---------
def _scheduler(port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
         "--no-dashboard"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip


async def test_scheduler_killed_ten_times_then_stopped() -> None:
    """SIGKILL and restart x10, then SIGSTOP: every scrape is answered, each kill is seen as
    refused or closed (never a timeout: a lost connection is re-checked at once), each restart
    brings scheduler_up back, and the stopped scheduler is a timeout."""
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    answered = failed = 0
    stop = asyncio.Event()
    proc: subprocess.Popen[bytes] | None = None
    downs: list[float] = []

    async def scraper(ex: Any) -> None:
        nonlocal answered, failed
        while not stop.is_set():
            try:
                status = (await ex.get("/metrics"))[0]
            except (OSError, asyncio.TimeoutError):
                status = 0
            answered += status == 200
            failed += status != 200
            await asyncio.sleep(0.05)

    async with serve_exporter(scheduler=address, timeout=5.0, max_backoff=0.5) as ex:
        task = asyncio.create_task(scraper(ex))
        try:
            for _ in range(10):
                proc = _scheduler(port)
                await ex.wait_for(lambda s: scalar(s, n.SCHEDULER_UP) == 1, timeout=60, what="up")
                proc.kill()
                proc.wait(30)
                killed = time.monotonic()
                await ex.wait_for(lambda s: scalar(s, n.SCHEDULER_UP) == 0, what="down")
                downs.append(time.monotonic() - killed)
            s = await ex.scrape()
            assert source_errors(s, reason="timeout") == 0
            assert source_errors(s, reason="refused") + source_errors(s, reason="closed") >= 10

            proc = _scheduler(port)
            await ex.wait_for(lambda s: scalar(s, n.SCHEDULER_UP) == 1, timeout=60, what="up")
            os.killpg(proc.pid, signal.SIGSTOP)
            stopped = time.monotonic()
            await ex.wait_for(
                lambda s: source_errors(s, reason="timeout") >= 1, timeout=60, what="a timeout"
            )
            stopped_seen = time.monotonic() - stopped
            assert (await ex.get("/healthz"))[0] == 200
            assert (await ex.get("/readyz"))[0] == 503
        finally:
            stop.set()
            await task
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGCONT)
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(30)
    assert failed == 0 and answered > 0
    print(
        f"10 kills: {answered} scrapes answered, {failed} failed; down seen after "
        f"{min(downs):.2f}-{max(downs):.2f} s (median {sorted(downs)[5]:.2f} s); "
        f"SIGSTOP seen as a timeout after {stopped_seen:.1f} s (--timeout 5s)"
    )


# --- worker churn on a real scheduler ---------
async def test_worker_churn_leaves_no_ghosts() -> None:
    """Workers leave and join in three rounds: the exported workers are exactly the current
    ones after each round (no series of a departed worker stays behind)."""
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    scheduler = await Scheduler(host="127.0.0.1", port=port, dashboard=False, validate=False)
    workers: dict[str, Worker] = {}

    async def start(name: str) -> None:
        workers[name] = await Worker(address, name=name, host="127.0.0.1", nthreads=1)

    try:
        for name in ("w0", "w1", "w2"):
            await start(name)
        async with serve_exporter(scheduler=address) as ex:
            for round_ in range(1, 4):
                await ex.wait_for(
                    lambda s: set(by_worker_name(s, n.WORKER_PROCESS_BYTES)) == set(workers),
                    timeout=60,
                    what=f"exactly {sorted(workers)}",
                )
                for name in sorted(workers)[:2]:
                    await workers.pop(name).close()
                for i in range(2):
                    await start(f"r{round_}-{i}")
            s = await ex.wait_for(
                lambda s: set(by_worker_name(s, n.WORKER_PROCESS_BYTES)) == set(workers),
                timeout=60,
                what="the last round",
            )
            for metric in (n.WORKER_MANAGED_BYTES, n.WORKER_HEARTBEAT_AGE_SECONDS):
                assert set(by_worker_name(s, metric)) == set(workers)
    finally:
        for w in workers.values():
            await w.close()
        await scheduler.close()


# --- 200 concurrent scrapes ---------
async def test_two_hundred_concurrent_scrapes(stand_in: StandIn) -> None:
    stand_in.workers({f"tcp://10.0.{i // 250}.{i % 250}:4000": entry(f"w{i}") for i in range(1000)})
    async with serve_exporter(scheduler=stand_in.server.address) as ex:
        await ex.wait_for(lambda s: scalar(s, n.SCHEDULER_WORKERS) == 1000, what="1,000 workers")
        started = time.monotonic()
        results = await asyncio.gather(
            *(ex.get("/metrics", **{"Accept-Encoding": "gzip"}) for _ in range(200))
        )
        elapsed = time.monotonic() - started
    assert [status for status, _, _ in results] == [200] * 200
    for body in {body for _, _, body in results}:  # one per poll the scrapes spanned
        samples: Samples = parse(body.decode())
        assert len(by_worker_name(samples, n.WORKER_PROCESS_BYTES)) == 1000
    print(f"200 concurrent scrapes of 1,000 workers: all answered in {elapsed:.2f} s")


# --- oversized requests against the real serve process ---------
def _send_body(port: int, head: bytes, body_chunks: int, chunk: bytes) -> int:
    """Send ``head``, then up to ``body_chunks`` chunks while the server reads; the status."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(head)
        try:
            for _ in range(body_chunks):
                s.sendall(chunk)
        except OSError:
            pass  # the server answered and closed: it does not have to read it all
        s.settimeout(10)
        try:
            data = s.recv(4096)
        except OSError:
            return 0
    parts = data.split(b" ", 2)
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0


def test_oversized_requests(tmp_path: Path) -> None:
    """A 1 MB request target, 10,000 headers, a 100 MB body and an endless chunked body: each
    is refused with a 4xx (or the connection closed), memory does not grow with what was
    sent, nothing is logged at ERROR, and /metrics answers afterwards."""
    mib = b"a" * MiB
    with serve(workdir=tmp_path) as ex:
        rss_before = psutil.Process(ex.process.pid).memory_info().rss
        target = raw_request(ex.port, b"GET /" + b"a" * MiB + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        headers = raw_request(
            ex.port,
            b"GET /metrics HTTP/1.1\r\nHost: x\r\n"
            + b"".join(b"X-%d: y\r\n" % i for i in range(10_000))
            + b"\r\n",
        )
        sized = _send_body(
            ex.port,
            b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 104857600\r\n\r\n",
            100,
            mib,
        )
        chunked = _send_body(
            ex.port,
            b"POST /metrics HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
            100,
            b"100000\r\n" + mib + b"\r\n",
        )
        assert get(ex.url + "/metrics")[0] == 200
        rss_after = psutil.Process(ex.process.pid).memory_info().rss
        log = ex.log_lines()
    print(
        f"1 MB target -> {target}, 10,000 headers -> {headers}, 100 MB body -> {sized}, "
        f"chunked body -> {chunked}; RSS {rss_before / MiB:.1f} -> {rss_after / MiB:.1f} MiB"
    )
    for status in (target, headers, sized, chunked):
        assert status == 0 or 400 <= status < 500, status
    assert rss_after - rss_before < 50 * MiB
    assert not any("Traceback" in line or "ERROR" in line for line in log), "\n".join(log)
