"""The memory model: MemoryState's clipping and the scheduler's sliding-window minimum."""

from __future__ import annotations

import random

import pytest
from distributed.scheduler import MemoryState

from dask_memory_exporter.memory import (
    MemoryBreakdown,
    MemoryModel,
    UnmanagedHistory,
    WorkerReading,
)

MiB = 2**20


def reading(
    t: float, process: int, managed_total: int = 0, spilled_memory: int = 0, spilled_disk: int = 0
) -> WorkerReading:
    return WorkerReading(
        process=process,
        managed_total=managed_total,
        spilled_memory=spilled_memory,
        spilled_disk=spilled_disk,
        heartbeat_time=t,
    )


def reference_old(samples: list[tuple[float, int]], window: float) -> int:
    """The scheduler's algorithm, literally: drop samples older than now - window, then min."""
    now = samples[-1][0]
    return min(size for t, size in samples if t >= now - window)


def test_parts_add_up_to_process() -> None:
    m = MemoryBreakdown(process=300, managed=100, unmanaged_old=150, spilled=40)
    assert (m.managed, m.unmanaged_old, m.unmanaged_recent, m.spilled) == (100, 150, 50, 40)
    assert m.managed + m.unmanaged_old + m.unmanaged_recent == m.process


@pytest.mark.parametrize(
    ("process", "managed", "old", "expect"),
    [
        (100, 150, 10, (100, 100, 0, 0)),  # managed larger than process (sizeof overestimates)
        (100, 40, 90, (100, 40, 60, 0)),  # old larger than what is left
        (100, -5, -5, (100, 0, 0, 100)),  # negative inputs never leak out
        (-1, 0, 0, (0, 0, 0, 0)),
    ],
)
def test_clipping_keeps_invariant(
    process: int, managed: int, old: int, expect: tuple[int, int, int, int]
) -> None:
    m = MemoryBreakdown(process=process, managed=managed, unmanaged_old=old, spilled=0)
    assert (m.process, m.managed, m.unmanaged_old, m.unmanaged_recent) == expect


def _parts(m: MemoryBreakdown | MemoryState) -> tuple[int, int, int, int, int]:
    return (m.process, m.managed, m.unmanaged_old, m.unmanaged_recent, m.spilled)


def _check_invariants(m: MemoryBreakdown) -> None:
    assert min(_parts(m)) >= 0, m
    assert m.managed + m.unmanaged_old + m.unmanaged_recent == m.process, m
    assert m.unmanaged == m.unmanaged_old + m.unmanaged_recent, m


def test_same_breakdown_as_dask_memory_state() -> None:
    """For the inputs Dask sees (none negative), the breakdown is distributed's own
    MemoryState, part for part; negative inputs, which MemoryState would let through,
    still give parts that add up and none below zero."""
    rng = random.Random(42)
    for _ in range(5000):
        # Small or large scales, so that each clip (managed > process, old > the rest) happens.
        scale = rng.choice([10**3, 10**9])
        args = {
            k: rng.randint(0, scale) for k in ("process", "managed", "unmanaged_old", "spilled")
        }
        m = MemoryBreakdown(**args)
        assert _parts(m) == _parts(MemoryState(**args)), args
        _check_invariants(m)
        negative = {k: v - rng.randint(0, 2 * scale) for k, v in args.items()}
        _check_invariants(MemoryBreakdown(**negative))


def test_window_minimum_matches_scheduler_algorithm() -> None:
    rng = random.Random(7)
    window = 30.0
    h = UnmanagedHistory(window)
    samples: list[tuple[float, int]] = []
    t = 1000.0
    for _ in range(3000):
        t += rng.choice([0.5, 0.5, 1.0, 2.0, 13.0, 31.0])
        size = rng.randint(0, 500) * MiB
        samples.append((t, size))
        assert h.add(t, size) == reference_old(samples, window)
    assert len(h) <= 2 * window / 0.5 + 2  # bounded by the window, not by history


def test_leak_moves_from_recent_to_old_after_the_window() -> None:
    model = MemoryModel(recent_to_old_time=30)
    base = 100 * MiB
    out = {}
    for i in range(0, 61):  # heartbeat every second; 50 MiB appears at t=10 and stays
        t = float(i)
        process = base + (50 * MiB if t >= 10 else 0)
        out = model.update({"w": reading(t, process)})
        m = out["w"]
        assert m.managed + m.unmanaged_old + m.unmanaged_recent == m.process
        if 10 <= t < 40:
            assert m.unmanaged_recent == 50 * MiB, t
        if t >= 40:
            assert (m.unmanaged_old, m.unmanaged_recent) == (base + 50 * MiB, 0), t


def test_spike_stays_recent_and_falls_back() -> None:
    model = MemoryModel(recent_to_old_time=30)
    for i in range(100):
        spike = 200 * MiB if 20 <= i < 25 else 0
        m = model.update({"w": reading(float(i), 100 * MiB + spike)})["w"]
        assert m.unmanaged_old == 100 * MiB
        assert m.unmanaged_recent == spike


def test_managed_and_spilled_follow_the_scheduler() -> None:
    model = MemoryModel(recent_to_old_time=30)
    r = reading(
        1.0, 400 * MiB, managed_total=500 * MiB, spilled_memory=300 * MiB, spilled_disk=290 * MiB
    )
    m = model.update({"w": r})["w"]
    assert m.managed == 200 * MiB  # managed_bytes includes spilled keys: subtract them
    assert m.spilled == 290 * MiB  # size on disk
    assert m.unmanaged_old == 200 * MiB


def test_repeated_heartbeat_adds_no_sample() -> None:
    model = MemoryModel(recent_to_old_time=30)
    model.update({"w": reading(1.0, 100 * MiB)})
    # Polled again before the next heartbeat: same last_seen, must not count as a new sample
    # (it would otherwise keep an expired minimum alive with a fresh timestamp).
    for _ in range(5):
        model.update({"w": reading(1.0, 100 * MiB)})
    m = model.update({"w": reading(40.0, 300 * MiB)})["w"]
    assert m.unmanaged_old == 300 * MiB


def test_departed_worker_is_forgotten() -> None:
    model = MemoryModel(recent_to_old_time=30)
    model.update({"a": reading(1.0, 100 * MiB), "b": reading(1.0, 100 * MiB)})
    out = model.update({"a": reading(2.0, 100 * MiB)})
    assert set(out) == {"a"}
    assert len(model) == 1
    # The same address coming back starts a fresh window (a restarted worker).
    m = model.update({"a": reading(3.0, 100 * MiB), "b": reading(3.0, 900 * MiB)})["b"]
    assert m.unmanaged_old == 900 * MiB


def test_process_override_lands_in_recent() -> None:
    model = MemoryModel(recent_to_old_time=30)
    r = reading(1.0, 100 * MiB, managed_total=20 * MiB)
    m = model.update({"w": r}, process_override={"w": 180 * MiB})["w"]
    assert (m.process, m.managed, m.unmanaged_old, m.unmanaged_recent) == (
        180 * MiB,
        20 * MiB,
        80 * MiB,
        80 * MiB,
    )


def test_model_over_random_polls_matches_the_scheduler() -> None:
    """Random polls of a changing set of workers: heartbeats at irregular intervals, polls
    that see the same heartbeat again, workers leaving and coming back, sidecar RSS overrides.
    Each breakdown is what the scheduler would show: MemoryState of the heartbeat's figures
    with unmanaged_old the minimum of that worker's distinct heartbeat samples in the window."""
    rng = random.Random(11)
    window = 30.0
    model = MemoryModel(recent_to_old_time=window)
    samples: dict[str, list[tuple[float, int]]] = {}
    last: dict[str, WorkerReading] = {}
    clock = {f"w{i}": 1000.0 for i in range(6)}
    for _ in range(2000):
        readings = {}
        for addr in clock:
            if rng.random() < 0.05:
                continue  # absent from this poll: forgotten
            if addr in samples and rng.random() < 0.3:
                readings[addr] = last[addr]  # polled again before the next heartbeat
                continue
            clock[addr] += rng.choice([0.5, 1.0, 1.0, 2.0, 7.0, 31.0])
            spilled_memory = rng.randint(0, 300) * MiB
            readings[addr] = reading(
                clock[addr],
                rng.randint(0, 2000) * MiB,
                managed_total=rng.randint(0, 1500) * MiB + spilled_memory,
                spilled_memory=spilled_memory,
                spilled_disk=rng.randint(0, 300) * MiB,
            )
        override = {a: rng.randint(0, 2000) * MiB for a in readings if rng.random() < 0.2}
        out = model.update(readings, process_override=override)

        for gone in samples.keys() - readings.keys():
            del samples[gone]
        assert set(out) == set(readings)
        for addr, r in readings.items():
            history = samples.setdefault(addr, [])
            if not history or history[-1][0] != r.heartbeat_time:
                history.append((r.heartbeat_time, r.unmanaged_sample))
            last[addr] = r
            expected = MemoryState(
                process=override.get(addr, r.process),
                managed=r.managed,
                unmanaged_old=reference_old(history, window),
                spilled=r.spilled_disk,
            )
            _check_invariants(out[addr])
            assert _parts(out[addr]) == _parts(expected), (addr, r)
    assert len(model) == len(samples)
