"""Heartbeat gauges on a real cluster: the executing-task count of each worker."""

from __future__ import annotations

from distributed import Client, Event, Scheduler, Worker

from dask_memory_exporter.heartbeat import WORKER_EXECUTING_TASKS
from tests.support.live import by_worker_name, serve_exporter


def _wait_on(event: Event) -> None:
    event.wait()


async def test_executing_tasks_follow_the_workers_tasks() -> None:
    """Two tasks held on worker "a", none on "b": 2 and 0, then 0 once they are released."""
    async with Scheduler(host="127.0.0.1", port=0, dashboard=False) as scheduler:
        address = scheduler.address
        async with (
            Worker(address, name="a", nthreads=2, host="127.0.0.1"),
            Worker(address, name="b", nthreads=1, host="127.0.0.1"),
            Client(address, asynchronous=True) as client,
            serve_exporter(scheduler=address) as ex,
        ):
            release = Event(client=client)
            futures = client.map(_wait_on, [release, release], workers=["a"], pure=False)
            await ex.wait_for(
                lambda s: by_worker_name(s, WORKER_EXECUTING_TASKS) == {"a": 2, "b": 0},
                what="two tasks executing on a",
            )
            await release.set()
            await client.gather(futures)
            await ex.wait_for(
                lambda s: by_worker_name(s, WORKER_EXECUTING_TASKS) == {"a": 0, "b": 0},
                what="no task executing",
            )
