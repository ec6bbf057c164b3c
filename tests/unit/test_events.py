"""EventsSource's counting rules, on event logs written as data.

The scheduler here is a stand-in that answers ``identity`` and ``events`` from a dict, in the
shapes distributed 2026.8 returns (``(timestamp, message)`` pairs, sets of task keys): what is
tested is the bookkeeping (once per event, across exporter restarts, log rotation, scheduler
restarts, causes). Real nanny kills and SIGKILLs are in tests/integration/test_outcomes.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
from distributed import Scheduler
from distributed.security import Security

from dask_memory_exporter import names as n
from dask_memory_exporter.events import (
    CAUSE_GRACE_SECONDS,
    MAX_TOPICS_PER_POLL,
    RESTART_TOPIC,
    EventsSource,
    InProcessScheduler,
    cause_of,
    read_departure,
)
from dask_memory_exporter.source import SourceError, WorkerInfo
from tests.support.workers import info, workers

A = "tcp://10.0.0.5:40001"
A2 = "tcp://10.0.0.5:40077"  # the same pod's worker after its nanny restarted it
B = "tcp://10.0.0.7:40001"
C = "tcp://10.0.0.7:40002"  # a second worker on B's host


class Log:
    """The scheduler's event log as the ``events`` handler returns it, and its identity."""

    def __init__(self) -> None:
        self.topics: dict[str, list[tuple[float, dict[str, Any]]]] = {}
        self.id = "Scheduler-1"
        self.n_workers = 0
        self.calls: list[tuple[str, str | None]] = []
        self.fail_topic: str | None = None

    def restart(self, t: float, worker: str, pid: int = 100) -> None:
        self.topics.setdefault(RESTART_TOPIC, []).append(
            (t, {"worker": worker, "pid": pid, "rss": 300 * 2**20})
        )

    def remove(self, t: float, worker: str, *, expected: bool = False, **tasks: set[str]) -> None:
        self.topics.setdefault(worker, []).append((t - 5, {"action": "add-worker"}))
        self.topics[worker].append(
            (
                t,
                {
                    "action": "remove-worker",
                    "processing-tasks": tasks.get("processing", set()),
                    "lost-computed-tasks": tasks.get("computed", set()),
                    "lost-scattered-tasks": tasks.get("scattered", set()),
                    "stimulus_id": tasks.get("stimulus", {"handle-worker-cleanup-1"}).pop(),
                    "expected": expected,
                },
            )
        )

    async def call(self, op: str, **kwargs: Any) -> Any:
        topic = kwargs.get("topic")
        self.calls.append((op, topic))
        if op == "identity":
            return {"id": self.id, "n_workers": self.n_workers, "workers": {}}
        if topic == self.fail_topic:
            raise SourceError("closed", "connection lost")
        return tuple(self.topics.get(topic, ()))

    async def close(self) -> None:
        pass


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def source(log: Log, clock: Clock | None = None, log_length: int = 1000) -> EventsSource:
    s = EventsSource(
        "tcp://127.0.0.1:8786", Security(), 5, log_length=log_length, clock=clock or Clock()
    )
    s.connection = log  # type: ignore[assignment]
    return s


async def poll(s: EventsSource, log: Log, *ws: WorkerInfo) -> dict[str, dict[str, float]]:
    roster: Mapping[str, WorkerInfo] = workers(*ws)
    log.n_workers = len(roster)
    result = await s.fetch(roster)
    return {
        metric: {",".join(labels): v for labels, v in series.items()}
        for metric, series in result.counters.items()
    }


def restarts(counters: dict[str, dict[str, float]]) -> dict[str, float]:
    return counters[n.WORKER_MEMORY_RESTARTS_TOTAL]


def lost(counters: dict[str, dict[str, float]]) -> dict[str, float]:
    return {k: v for k, v in counters[n.WORKERS_LOST_TOTAL].items() if v}


def tasks(counters: dict[str, dict[str, float]]) -> dict[str, float]:
    return {k: v for k, v in counters[n.LOST_TASKS_TOTAL].items() if v}


async def test_every_series_starts_at_zero() -> None:
    log = Log()
    c = await poll(source(log), log, info(A, "a"), info(B, "b"))
    assert restarts(c) == {"a": 0, "b": 0}
    assert c[n.WORKERS_LOST_TOTAL] == dict.fromkeys(n.CAUSES, 0)
    assert c[n.LOST_TASKS_TOTAL] == dict.fromkeys(n.TASK_KINDS, 0)


async def test_a_restart_counts_once_by_name_across_polls() -> None:
    log, s = Log(), None
    s = source(log)
    await poll(s, log, info(A, "a"), info(B, "b"))
    log.restart(100.0, A)
    c = await poll(s, log, info(A2, "a"), info(B, "b"))
    assert restarts(c) == {"a": 1, "b": 0}
    for _ in range(3):
        c = await poll(s, log, info(A2, "a"), info(B, "b"))
    assert restarts(c) == {"a": 1, "b": 0}
    log.restart(200.0, A2)
    log.restart(200.0, B, pid=7)  # the same instant: two events all the same
    c = await poll(s, log, info(A2, "a"), info(B, "b"))
    assert restarts(c) == {"a": 2, "b": 1}


async def test_an_exporter_restart_rebuilds_the_same_value() -> None:
    log = Log()
    first = source(log)
    await poll(first, log, info(A, "a"), info(B, "b"))
    log.restart(100.0, A)
    before = restarts(await poll(first, log, info(A2, "a"), info(B, "b")))
    # A new exporter never saw A: the one worker on A's host now is "a", restarted.
    again = source(log)
    after = restarts(await poll(again, log, info(A2, "a"), info(B, "b")))
    assert before == after == {"a": 1, "b": 0}
    assert restarts(await poll(again, log, info(A2, "a"), info(B, "b"))) == after


async def test_a_killed_worker_never_seen_on_a_shared_host_has_no_name() -> None:
    log = Log()
    log.restart(100.0, B)
    c = await poll(source(log), log, info("tcp://10.0.0.7:40009", "b"), info(C, "c"))
    assert restarts(c) == {"b": 0, "c": 0, "": 1}


async def test_a_full_log_at_start_counts_from_its_newest_event() -> None:
    log = Log()
    for i in range(5):
        log.restart(100.0 + i, A, pid=i)
    s = source(log, log_length=5)
    assert restarts(await poll(s, log, info(A2, "a"))) == {"a": 0}
    log.restart(200.0, A2)
    log.topics[RESTART_TOPIC].pop(0)  # the log rotates
    assert restarts(await poll(s, log, info(A2, "a"))) == {"a": 1}
    # Not full: every event is the scheduler's whole history.
    short = Log()
    for i in range(4):
        short.restart(100.0 + i, A, pid=i)
    assert restarts(await poll(source(short, log_length=5), short, info(A2, "a"))) == {"a": 4}


async def test_while_running_a_rotating_log_loses_no_count() -> None:
    log = Log()
    s = source(log, log_length=3)
    await poll(s, log, info(A, "a"))
    for i in range(10):
        log.restart(100.0 + i, A, pid=i)
        log.topics[RESTART_TOPIC] = log.topics[RESTART_TOPIC][-3:]
        c = await poll(s, log, info(A, "a"))
    assert restarts(c) == {"a": 10}


async def test_a_new_scheduler_starts_the_count_again() -> None:
    log = Log()
    s = source(log)
    log.restart(100.0, A)
    assert restarts(await poll(s, log, info(A, "a"))) == {"a": 1}
    log.id, log.topics = "Scheduler-2", {}
    assert restarts(await poll(s, log, info(A2, "a"))) == {"a": 0}


async def test_nothing_is_counted_before_the_roster_reports_the_workers() -> None:
    log = Log()
    log.restart(100.0, A)
    s = source(log)
    log.n_workers = 2
    result = await s.fetch({})
    assert result.counters[n.WORKER_MEMORY_RESTARTS_TOTAL] == {}
    assert ("events", RESTART_TOPIC) not in log.calls
    assert restarts(await poll(s, log, info(A2, "a"), info(B, "b"))) == {"a": 1, "b": 0}


async def test_a_worker_lost_with_its_tasks_waits_for_a_memory_record_then_counts() -> None:
    log, clock = Log(), Clock()
    s = source(log, clock)
    await poll(s, log, info(A, "a"), info(B, "b"))
    log.remove(50.0, B, computed={"x-1", "x-2"}, scattered={"s"}, processing={"y"})
    c = await poll(s, log, info(A, "a"))
    assert lost(c) == {}  # its nanny's memory event may still be on its way
    clock.now = CAUSE_GRACE_SECONDS
    c = await poll(s, log, info(A, "a"))
    assert lost(c) == {n.CAUSE_CONNECTION_LOST: 1}
    assert tasks(c) == {n.TASKS_COMPUTED: 2, n.TASKS_SCATTERED: 1, n.TASKS_PROCESSING: 1}
    # Its topic was read once, however many polls followed.
    for _ in range(3):
        c = await poll(s, log, info(A, "a"))
    assert log.calls.count(("events", B)) == 1
    assert lost(c) == {n.CAUSE_CONNECTION_LOST: 1}


async def test_a_memory_restart_is_a_loss_by_memory_at_once() -> None:
    log = Log()
    s = source(log)
    await poll(s, log, info(A, "a"))
    log.restart(99.0, A)
    log.remove(100.0, A, computed={"x"})
    c = await poll(s, log, info(A2, "a"))
    assert lost(c) == {n.CAUSE_MEMORY_RESTART: 1}
    assert tasks(c) == {n.TASKS_COMPUTED: 1}


async def test_the_memory_record_may_come_after_the_departure() -> None:
    log, clock = Log(), Clock()
    s = source(log, clock)
    await poll(s, log, info(A, "a"))
    log.remove(100.0, A)
    await poll(s, log, info(A2, "a"))
    log.restart(99.0, A)
    clock.now = 1.0
    c = await poll(s, log, info(A2, "a"))
    assert lost(c) == {n.CAUSE_MEMORY_RESTART: 1}
    assert restarts(c) == {"a": 1}


async def test_expected_departures_and_unrecorded_ones_are_not_losses() -> None:
    log, clock = Log(), Clock()
    s = source(log, clock)
    await poll(s, log, info(A, "a"), info(B, "b"), info(C, "c"))
    log.remove(100.0, A, expected=True, computed={"x"})
    log.topics[C] = [(90.0, {"action": "add-worker"}), (95.0, "odd"), ("?", {})]  # no removal
    await poll(s, log, info(B, "b"))
    clock.now = 10.0
    c = await poll(s, log, info(B, "b"))
    assert lost(c) == {} and tasks(c) == {}


async def test_a_failed_topic_read_is_retried_and_counted_once() -> None:
    log, clock = Log(), Clock()
    s = source(log, clock)
    await poll(s, log, info(A, "a"), info(B, "b"))
    log.remove(100.0, B, stimulus={"check-worker-ttl-1"})
    log.fail_topic = B
    with pytest.raises(SourceError):
        await poll(s, log, info(A, "a"))
    log.fail_topic = None
    clock.now = 10.0
    await poll(s, log, info(A, "a"))
    clock.now = 20.0
    c = await poll(s, log, info(A, "a"))
    assert lost(c) == {n.CAUSE_HEARTBEAT_TIMEOUT: 1}


async def test_departed_topics_read_per_poll_are_bounded() -> None:
    log, clock = Log(), Clock()
    s = source(log, clock)
    many = [info(f"tcp://10.0.1.{i}:40001", f"w{i}") for i in range(MAX_TOPICS_PER_POLL + 5)]
    await poll(s, log, *many)
    for w in many:
        log.remove(100.0, w.address)
    log.calls.clear()
    await poll(s, log)
    assert sum(op == "events" for op, _ in log.calls) == 1 + MAX_TOPICS_PER_POLL
    clock.now = 10.0
    log.calls.clear()
    c = await poll(s, log)
    assert sum(op == "events" for op, _ in log.calls) == 1 + 5
    clock.now = 20.0
    c = await poll(s, log)
    assert lost(c) == {n.CAUSE_CONNECTION_LOST: len(many)}


def test_causes_from_the_scheduler_stimulus() -> None:
    assert cause_of("handle-worker-cleanup-1796271029.1") == n.CAUSE_CONNECTION_LOST
    assert cause_of("check-worker-ttl-1796271029.1") == n.CAUSE_HEARTBEAT_TIMEOUT
    assert cause_of("restart-workers-1") == n.CAUSE_OTHER
    assert read_departure(A, [(1.0, {"action": "remove-worker", "expected": True})]) is None
    odd = read_departure(A, [(1.0, {"action": "remove-worker", "lost-computed-tasks": 3})])
    assert odd is not None and dict(odd.tasks)[n.TASKS_COMPUTED] == 0


async def test_in_process_calls_read_a_real_schedulers_log() -> None:
    """Inside the scheduler (the preload) the same handlers are called on the object itself."""
    async with Scheduler(port=0, dashboard_address=":0", validate=False) as sched:
        sched.log_event(RESTART_TOPIC, {"worker": A, "pid": 1, "rss": 1})
        s = EventsSource(
            sched.address, Security(), 5, connection=InProcessScheduler(sched), clock=Clock()
        )
        result = await s.fetch(workers(info(A2, "a")))
        assert result.counters[n.WORKER_MEMORY_RESTARTS_TOTAL] == {("a",): 1.0}
        with pytest.raises(ValueError, match="no handler"):
            await InProcessScheduler(sched).call("run_function")
