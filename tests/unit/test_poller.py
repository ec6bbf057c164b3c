"""Poll pacing: never faster than the scheduler's heartbeat, exponential backoff when down.

The failures here are raised by a stand-in source: the pacing arithmetic is what is tested;
real unreachable, hung and restarting schedulers are in tests/integration/test_faults.py.
"""

from __future__ import annotations

from typing import Any

import pytest

from dask_memory_exporter.memory import MemoryModel
from dask_memory_exporter.scheduler import SchedulerPoll
from dask_memory_exporter.snapshot import Poller, Snapshot


class Source:
    def __init__(self) -> None:
        self.fail = False
        self.n_workers = 0

    async def fetch(self) -> SchedulerPoll:
        if self.fail:
            raise OSError("connection refused")
        return SchedulerPoll("tcp://s:1", {}, skipped=self.n_workers)

    async def close(self) -> None:
        pass


async def _publish(s: Snapshot) -> None:
    pass


def poller(source: Any, **kw: Any) -> Poller:
    return Poller(source, MemoryModel(30), {}, _publish, **kw)


@pytest.mark.parametrize(("workers", "delay"), [(0, 0.5), (10, 0.5), (11, 1), (49, 1), (199, 2),
                                                (1000, 6), (5000, 26)])
async def test_interval_follows_heartbeat(workers: int, delay: float) -> None:
    src = Source()
    src.n_workers = workers  # counted as skipped entries: the size the scheduler reported
    p = poller(src)
    await p.poll_once()
    assert p.next_delay() == delay


async def test_min_interval_wins_when_slower() -> None:
    p = poller(Source(), min_interval=15)
    await p.poll_once()
    assert p.next_delay() == 15


async def test_backoff_grows_to_the_cap_and_resets() -> None:
    src = Source()
    src.fail = True
    p = poller(src, max_backoff=8)
    delays = []
    for _ in range(8):
        snap = await p.poll_once()
        delays.append(p.next_delay())
    assert not snap.scheduler_up and snap.poll_errors_total == 8
    assert delays[0] < delays[2] < delays[3]
    assert max(delays) <= 8 and delays[-1] >= 8 * 0.8
    src.fail = False
    snap = await p.poll_once()
    assert snap.scheduler_up and snap.polled and p.next_delay() == 0.5
