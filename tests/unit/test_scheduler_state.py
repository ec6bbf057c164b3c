"""SchedulerStateSource and the preload's pure parts, on real ``distributed`` WorkerState objects.

The WorkerStates are the scheduler's own class, built in-process and filled as the scheduler's
heartbeat handler fills them (metrics, nbytes, the unmanaged window's minimum); no scheduler
or worker runs here (that is tests/integration/test_preload.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import click
import pytest
from distributed.core import Status
from distributed.scheduler import WorkerState

from dask_memory_exporter import names as n
from dask_memory_exporter.heartbeat import WORKER_EXECUTING_TASKS
from dask_memory_exporter.memory import MemoryModel
from dask_memory_exporter.preload import PreloadArgumentError, dask_setup, scrape_target
from dask_memory_exporter.scheduler_state import SchedulerStateSource
from dask_memory_exporter.snapshot import Poller, Snapshot

MiB = 2**20


def worker_state(
    i: int,
    *,
    process: int = 200 * MiB,
    nbytes: int = 50 * MiB,
    unmanaged_old: int = 90 * MiB,
    spilled_memory: int = 10 * MiB,
    spilled_disk: int = 12 * MiB,
    status: Status = Status.running,
) -> WorkerState:
    ws = WorkerState(
        address=f"tcp://10.0.0.{i}:40001",
        status=status,
        pid=1000 + i,
        name=f"w{i}",
        nthreads=2,
        memory_limit=400 * MiB,
        local_directory="/tmp",
        nanny=f"tcp://10.0.0.{i}:40002",
        server_id=f"Worker-{i}",
    )
    ws.metrics = {
        "memory": process,
        "managed_bytes": nbytes,
        "spilled_bytes": {"memory": spilled_memory, "disk": spilled_disk},
        "task_counts": {"executing": 2, "memory": 5},
    }
    ws.nbytes = nbytes
    ws._memory_unmanaged_old = unmanaged_old
    ws.last_seen = 5000.0 + i
    return ws


class SchedulerHolder:
    """Only what the source reads of a Scheduler: its ``workers`` mapping."""

    def __init__(self, *workers: WorkerState) -> None:
        self.workers: Mapping[str, Any] = {ws.address: ws for ws in workers}
        self.address = "tcp://10.0.0.1:8786"


async def test_fetch_copies_memory_state_exactly() -> None:
    ws = worker_state(1)
    res = await SchedulerStateSource(SchedulerHolder(ws)).fetch({})
    assert res.workers is not None and res.memory is not None
    info, mem, want = res.workers[ws.address], res.memory[ws.address], ws.memory
    assert (mem.process, mem.managed, mem.unmanaged_old, mem.spilled) == (
        want.process,
        want.managed,
        want.unmanaged_old,
        want.spilled,
    )
    assert mem.unmanaged_recent == want.unmanaged_recent == 200 * MiB - 40 * MiB - 90 * MiB
    assert info.name == "w1" and info.host == "10.0.0.1" and info.nthreads == 2
    assert info.memory_limit == 400 * MiB and info.status == "running"
    assert info.nanny == "tcp://10.0.0.1:40002" and info.last_seen == 5001.0
    assert info.reading.process == 200 * MiB and info.reading.spilled_disk == 12 * MiB
    assert res.values[ws.address] == {WORKER_EXECUTING_TASKS: 2.0}
    assert res.skipped == 0


async def test_paused_status_and_no_limit() -> None:
    ws = worker_state(2, status=Status.paused)
    ws.memory_limit = 0
    res = await SchedulerStateSource(SchedulerHolder(ws)).fetch({})
    assert res.workers is not None
    assert res.workers[ws.address].status == "paused"
    assert res.workers[ws.address].memory_limit is None


async def test_a_broken_worker_state_hides_no_other() -> None:
    good, bad = worker_state(1), worker_state(2)
    bad.metrics = {"memory": "lots"}  # MemoryState cannot be built from this
    res = await SchedulerStateSource(SchedulerHolder(good, bad)).fetch({})
    assert res.workers is not None and set(res.workers) == {good.address}
    assert res.skipped == 1


async def test_the_poller_uses_the_breakdown_as_handed_over() -> None:
    """The model, from a single heartbeat, would say unmanaged_recent is 0; the scheduler's
    window says otherwise, and the snapshot must carry the scheduler's figures."""
    ws = worker_state(3, unmanaged_old=30 * MiB)
    published: list[Snapshot] = []

    async def publish(s: Snapshot) -> None:
        published.append(s)

    poller = Poller([SchedulerStateSource(SchedulerHolder(ws))], MemoryModel(30.0), {}, publish)
    snap = await poller.poll_once()
    (w,) = snap.workers
    assert w.memory.unmanaged_old == ws.memory.unmanaged_old == 30 * MiB
    assert w.memory.unmanaged_recent == ws.memory.unmanaged_recent > 0
    assert snap.scheduler_up and snap.scheduler_workers == 1
    assert [s.name for s in snap.sources] == [n.SOURCE_SCHEDULER]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--memory-exporter-port", "x"], "'x' is not a valid integer"),
        (["--memory-exporter-port", "-1"], "is not in the range"),
        (["--memory-exporter-bogus"], "No such option"),
        (["stray"], "unexpected extra argument"),
    ],
)
def test_bad_argv_reaches_the_callback_as_one_line(argv: list[str], expected: str) -> None:
    """As distributed's preload manager parses it once the scheduler runs (make_context)."""
    ctx = dask_setup.make_context("dask_setup", argv, allow_extra_args=False)
    error = ctx.params["argv_error"]
    assert expected in error and "\n" not in error


def test_bad_argv_on_the_command_line_is_a_one_line_click_error() -> None:
    """As ``dask scheduler`` checks it before starting (parse_args): exit 2, no usage text."""
    ctx = click.Context(dask_setup, allow_extra_args=False)
    with pytest.raises(PreloadArgumentError) as e:
        dask_setup.parse_args(ctx, ["--memory-exporter-port", "x"])
    assert e.value.exit_code == 2
    assert e.value.format_message().startswith("dask-memory-exporter preload: Invalid value")


def test_good_argv() -> None:
    ctx = dask_setup.make_context(
        "dask_setup",
        ["--memory-exporter-port", "0", "--memory-exporter-file-sd", "/tmp/x.json"],
        allow_extra_args=False,
    )
    assert ctx.params["memory_exporter_port"] == 0
    assert ctx.params["memory_exporter_file_sd"] == "/tmp/x.json"
    assert ctx.params["memory_exporter_host"] == "0.0.0.0"
    assert "argv_error" not in ctx.params


@pytest.mark.parametrize(
    ("host", "scheduler", "expected"),
    [
        ("0.0.0.0", "tcp://10.1.2.3:8786", "10.1.2.3:9787"),
        ("", "tcp://login1.cluster:8786", "login1.cluster:9787"),
        ("::", "tcp://[fd00::5]:8786", "[fd00::5]:9787"),
        ("127.0.0.1", "tcp://10.1.2.3:8786", "127.0.0.1:9787"),
        ("0.0.0.0", "inproc://10.9.9.9/1/1", "127.0.0.1:9787"),
    ],
)
def test_scrape_target(host: str, scheduler: str, expected: str) -> None:
    assert scrape_target(host, 9787, scheduler) == expected
