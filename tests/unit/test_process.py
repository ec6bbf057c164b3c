"""LocalProcessSource against real processes (the Poller's use of them: tests/unit/test_poller.py).

The process trees here are real: a Python process whose command line reads ``dask worker``
(so it is a worker host), with a real child holding 64 MiB and listening on a real socket, and
a child whose command line is multiprocessing's resource tracker. No Dask runs in them: what is
tested is finding, reading and matching processes, not Dask. Two faults cannot be produced for
real because the tests run as root, who may read every process's sockets and RSS; they are
simulated by overriding the source's one-call seams (``_listening``, ``_rss``), as a sidecar
of another UID or under hidepid would see them. Real ``dask worker`` processes and a real
nanny restart are in tests/integration/test_sidecar.py.
"""

from __future__ import annotations

import asyncio
import logging
import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import psutil
import pytest

from dask_memory_exporter.gpu_nvml import WORKER_GPU_PROCESS_MEMORY_BYTES, NvmlReader
from dask_memory_exporter.process import (
    LocalProcess,
    LocalProcessSource,
    LocalReading,
    use_proc_root,
)
from dask_memory_exporter.scheduler import WorkerInfo
from tests.support.live import free_port
from tests.support.workers import MiB, info, workers

HELD = 64 * MiB
_WORKER = f"""
import os, socket, time
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen()
held = b"x" * {HELD}  # written, so resident
print("worker", os.getpid(), s.getsockname()[1], flush=True)
time.sleep(300)
"""
_TRACKER = "from multiprocessing.resource_tracker import main; import time; time.sleep(300)"
_HOST = f"""
import os, socket, subprocess, sys, time
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen()
if "--no-nanny" not in sys.argv:
    subprocess.Popen([sys.executable, "-c", {_WORKER!r}])
    subprocess.Popen([sys.executable, "-c", {_TRACKER!r}])
print("host", os.getpid(), s.getsockname()[1], flush=True)  # after both children exist
time.sleep(300)
"""


@dataclass(frozen=True)
class Tree:
    """A ``dask worker`` host and its worker process (the host itself with --no-nanny)."""

    scheduler: str
    host_pid: int
    nanny: str
    worker_pid: int
    address: str
    """The worker process's listening address, as the scheduler would report it."""

    def worker(self, name: str | None = None) -> WorkerInfo:
        """The scheduler's entry for this worker, heard of just now."""
        return info(self.address, name, nanny=self.nanny, last_seen=time.time())


@contextmanager
def process_tree(*options: str) -> Iterator[Tree]:
    """Start ``python -c HOST dask worker <scheduler> <options>``; kill its session after."""
    scheduler = f"tcp://127.0.0.1:{free_port()}"  # never listened on: only its port is compared
    argv = [sys.executable, "-c", _HOST, "dask", "worker", scheduler, *options]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, start_new_session=True)
    assert proc.stdout is not None
    try:
        expected = 1 if "--no-nanny" in options else 2
        lines: dict[str, tuple[int, int]] = {}
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            deadline = time.monotonic() + 30
            while len(lines) < expected:
                assert sel.select(deadline - time.monotonic()), "process tree did not start"
                what, pid, port = proc.stdout.readline().decode().split()
                lines[what] = (int(pid), int(port))
        host_pid, nanny_port = lines["host"]
        worker_pid, worker_port = lines.get("worker", lines["host"])
        yield Tree(
            scheduler,
            host_pid,
            f"tcp://127.0.0.1:{nanny_port}",
            worker_pid,
            f"tcp://127.0.0.1:{worker_port}",
        )
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdout.close()


@pytest.fixture(scope="module")
def plain() -> Iterator[Tree]:
    """``dask worker <scheduler>``: no option tells its worker apart."""
    with process_tree() as tree:
        yield tree


@pytest.fixture(scope="module")
def named() -> Iterator[Tree]:
    with process_tree("--name", "solo") as tree:
        yield tree


class Source(LocalProcessSource):
    """The real source; sockets and RSS of chosen processes refused on demand (simulated)."""

    def __init__(self, tree: Tree) -> None:
        super().__init__(scheduler_address=tree.scheduler)
        self.sockets_denied = False
        self.rss_denied: set[int] = set()

    def _listening(self, proc: psutil.Process) -> frozenset[tuple[str, int]]:
        if self.sockets_denied:
            raise psutil.AccessDenied(proc.pid)
        return super()._listening(proc)

    def _rss(self, proc: psutil.Process) -> int:
        if proc.pid in self.rss_denied:
            raise psutil.AccessDenied(proc.pid)
        return super()._rss(proc)


def ours(reading: LocalReading, tree: Tree) -> list[LocalProcess]:
    """This tree's processes in a reading (other processes on the machine may be there too)."""
    return [p for p in reading.processes if p.pid in (tree.host_pid, tree.worker_pid)]


# --- finding and reading -------------------------------------------------------------------
def test_finds_the_worker_child_of_a_dask_worker_host(plain: Tree) -> None:
    """The host's child is the worker; the host and the resource tracker are not."""
    tree = {plain.host_pid} | {c.pid for c in psutil.Process(plain.host_pid).children()}
    assert len(tree) == 3
    reading = Source(plain).read()
    assert reading.ok and reading.denied == 0
    (p,) = [p for p in reading.processes if p.pid in tree]
    assert p.pid == plain.worker_pid
    assert p.rss is not None and HELD < p.rss < 4 * HELD
    assert p.start_time == psutil.Process(plain.worker_pid).create_time()
    assert (p.address, p.name) == (None, None)  # no scheduler entries given, no --name
    assert p in reading.unmatched and reading.matched == {}


def test_no_nanny_host_is_the_worker() -> None:
    with process_tree("--no-nanny") as tree:
        assert [p.pid for p in ours(Source(tree).read(), tree)] == [tree.host_pid]


def test_name_from_the_command_line(named: Tree) -> None:
    (p,) = ours(Source(named).read(), named)
    assert p.name == "solo"


def test_hosts_of_another_scheduler_are_ignored(plain: Tree) -> None:
    other = LocalProcessSource(scheduler_address=f"tcp://127.0.0.1:{free_port()}")
    assert ours(other.read(), plain) == []


# --- matching real processes to scheduler entries --------------------------------------------
def decoy(tree: Tree) -> WorkerInfo:
    """Another worker that, but for its sockets, could be this tree's."""
    port = free_port()
    return info(
        f"tcp://127.0.0.1:{port}", nanny=f"tcp://127.0.0.1:{port + 1}", last_seen=time.time()
    )


def test_matched_by_its_sockets(plain: Tree) -> None:
    reading = Source(plain).read(workers(decoy(plain), plain.worker(), decoy(plain)))
    assert set(reading.matched) == {plain.address}
    assert reading.matched[plain.address].pid == plain.worker_pid


def test_without_sockets_options_or_elimination_decide(plain: Tree, named: Tree) -> None:
    """Sockets refused (another UID): two identical-looking workers stay unmatched, RSS still
    reported; a --name, or one worker left, settles it."""
    source = Source(plain)
    source.sockets_denied = True
    (p,) = ours(source.read(workers(decoy(plain), plain.worker())), plain)
    assert p.address is None and p.rss is not None
    (p,) = ours(source.read(workers(plain.worker())), plain)
    assert p.address == plain.address

    source = Source(named)
    source.sockets_denied = True
    reading = source.read(workers(decoy(named), named.worker("solo")))
    assert reading.matched[named.address].pid == named.worker_pid


def test_a_match_sticks_while_the_scheduler_lists_it(plain: Tree) -> None:
    source = Source(plain)
    ws = workers(plain.worker(), decoy(plain))
    assert plain.address in source.read(ws).matched
    source.sockets_denied = True  # the evidence is gone; the match stays
    ws = workers(plain.worker(), decoy(plain))
    assert plain.address in source.read(ws).matched


def test_rss_denied_is_counted_and_warned_once(
    plain: Tree, caplog: pytest.LogCaptureFixture
) -> None:
    """The process stays, matched, without RSS (its heartbeat figures are used)."""
    source = Source(plain)
    source.rss_denied = {plain.worker_pid}
    ws = workers(plain.worker())
    with caplog.at_level(logging.WARNING, logger="dask_memory_exporter"):
        readings = [source.read(ws) for _ in range(3)]
    for reading in readings:
        (p,) = ours(reading, plain)
        assert (p.address, p.rss) == (plain.address, None)
        assert reading.denied == 1
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and f"process {plain.worker_pid}" in warnings[0]
    source.rss_denied = set()
    assert source.read(ws).denied == 0


def test_a_worker_that_exits_is_dropped() -> None:
    with process_tree() as tree:
        source = Source(tree)
        assert [p.pid for p in ours(source.read(), tree)] == [tree.worker_pid]
        worker = psutil.Process(tree.worker_pid)
        worker.kill()
        deadline = time.monotonic() + 10
        while worker.status() != psutil.STATUS_ZOMBIE:  # its parent never reaps it
            assert time.monotonic() < deadline, "the killed worker is still running"
            time.sleep(0.05)
        reading = source.read()
        assert reading.ok and ours(reading, tree) == []


# --- the procfs root ---------------------------------------------------------------------------
def test_a_source_refuses_a_procfs_psutil_does_not_read() -> None:
    with pytest.raises(ValueError, match=r"use_proc_root\('/host/proc'\)"):
        LocalProcessSource("/host/proc")
    LocalProcessSource("/proc/")  # the same procfs


def test_unreadable_process_table_warns_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(psutil, "PROCFS_PATH", psutil.PROCFS_PATH)  # restored afterwards
    use_proc_root("/nonexistent/proc/")
    source = LocalProcessSource("/nonexistent/proc")
    with caplog.at_level(logging.INFO, logger="dask_memory_exporter"):
        readings = [source.read({}) for _ in range(3)]
        assert [(r.ok, r.processes) for r in readings] == [(False, ())] * 3
        warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warnings) == 1 and "/nonexistent/proc" in warnings[0]
        caplog.clear()
        use_proc_root("/proc")  # the table comes back (a remount, say)
        assert source.read({}).ok
    assert any("readable again" in r.getMessage() for r in caplog.records)


# --- device memory per process through NVML (sidecar, optional) ------------------------------
class _Proc:
    def __init__(self, pid: int, used: int | None) -> None:
        self.pid, self.usedGpuMemory = pid, used


class StandInNvml:
    """pynvml's calls the reader makes, answering for one or two devices: there is no GPU on
    the machines the tests run on, so the device is simulated; the processes are real."""

    def __init__(self, per_device: list[list[_Proc]], graphics: list[_Proc] | None = None) -> None:
        self.per_device, self.graphics = per_device, graphics or []
        self.shut = False

    def nvmlInit(self) -> None:
        pass

    def nvmlShutdown(self) -> None:
        self.shut = True

    def nvmlDeviceGetCount(self) -> int:
        return len(self.per_device)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetComputeRunningProcesses(self, handle: int) -> list[_Proc]:
        return self.per_device[handle]

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle: int) -> list[_Proc]:
        return self.graphics if handle == 0 else []


def test_nvml_bytes_of_the_matched_worker_process(plain: Tree) -> None:
    """The worker process's device memory, summed over devices, on its scheduler address;
    a pid NVML gives no figure for (None, or NVML_VALUE_NOT_AVAILABLE) and other processes
    are left out; a process in both of NVML's lists counts once per device."""
    nvml = StandInNvml(
        [
            [_Proc(plain.worker_pid, 3 * 2**30), _Proc(1, 5 * 2**30), _Proc(plain.host_pid, None)],
            [_Proc(plain.worker_pid, 2**30)],
        ],
        graphics=[_Proc(plain.worker_pid, 3 * 2**30), _Proc(2, 2**64 - 1)],
    )
    reader = NvmlReader.open(load=lambda: nvml)  # type: ignore[arg-type, return-value]
    assert reader is not None
    assert reader.read() == {plain.worker_pid: 4 * 2**30, 1: 5 * 2**30}
    source = LocalProcessSource(scheduler_address=plain.scheduler, gpu=reader)
    assert source.families == (WORKER_GPU_PROCESS_MEMORY_BYTES,)
    result = asyncio.run(source.fetch(workers(decoy(plain), plain.worker())))
    assert result.values == {plain.address: {WORKER_GPU_PROCESS_MEMORY_BYTES: 4 * 2**30}}
    assert result.rss.keys() == {plain.address}  # RSS as before
    # Mode local: no scheduler entries, the process is exported by name, with its device memory.
    alone = asyncio.run(LocalProcessSource(scheduler_address=plain.scheduler, gpu=reader).fetch({}))
    assert [p.values for p in alone.local_only if p.pid == plain.worker_pid] == [
        {WORKER_GPU_PROCESS_MEMORY_BYTES: 4 * 2**30}
    ]


def test_without_pynvml_or_a_device_nothing_changes(plain: Tree) -> None:
    """No pynvml (simulated: it is installed for the tests), NVML without a device, or NVML
    failing in a read: no reader, or no values; the RSS is read as before."""
    assert NvmlReader.open(load=lambda: None) is None
    empty = StandInNvml([])
    assert NvmlReader.open(load=lambda: empty) is None  # type: ignore[arg-type, return-value]
    assert empty.shut  # initialised, found no device, released
    source = LocalProcessSource(scheduler_address=plain.scheduler)
    assert source.families == ()
    result = asyncio.run(source.fetch(workers(plain.worker())))
    assert result.values == {} and result.rss.keys() == {plain.address}

    class Failing(StandInNvml):
        def nvmlDeviceGetComputeRunningProcesses(self, handle: int) -> list[_Proc]:
            raise RuntimeError("GPU is lost")

    reader = NvmlReader.open(load=lambda: Failing([[]]))  # type: ignore[arg-type, return-value]
    assert reader is not None and reader.read() == {}
    gpu_source = LocalProcessSource(scheduler_address=plain.scheduler, gpu=reader)
    result = asyncio.run(gpu_source.fetch(workers(plain.worker())))
    assert result.values == {} and result.rss.keys() == {plain.address}


@pytest.mark.skipif(
    os.path.exists("/dev/nvidiactl"), reason="a GPU driver is present: NVML may open"
)
def test_real_nvml_without_a_driver_opens_nothing() -> None:
    """The real pynvml (installed with the test extra) on a machine without an NVIDIA driver:
    NVML's library is missing, so there is no reader and serve runs as before."""
    import pynvml  # noqa: F401  (importable: the test extra installs nvidia-ml-py)

    assert NvmlReader.open() is None
