"""The Dask memory model: per-worker breakdown exactly as the Dask dashboard computes it.

This module covers the arithmetic of ``distributed.scheduler.MemoryState`` and the scheduler's
sliding-window minimum of unmanaged memory (``Scheduler.heartbeat_worker``), mirrored from
polled heartbeat readings. It deliberately does no I/O and reads no clock: callers pass plain
numbers and the heartbeat time, so the model is unit-tested directly. Where the readings come
from is ``scheduler.py`` (heartbeats) and ``process.py`` (RSS read from the OS).

Quantities (Dask's own vocabulary, see distributed's ``worker-memory.rst``):

process
    The worker's RSS. Always exactly ``managed + unmanaged_old + unmanaged_recent``.
managed
    sizeof() of the Dask keys held in RAM (the worker's managed bytes minus spilled keys).
unmanaged_old
    The minimum of unmanaged memory (process - managed) over the last ``recent-to-old-time``
    seconds (30 s by default): memory that has stayed, e.g. a leak or the interpreter.
unmanaged_recent
    The rest of unmanaged memory: appeared within the window, hopefully a temporary spike.
spilled
    Bytes of spilled keys on disk. Not part of process memory.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["MemoryBreakdown", "MemoryModel", "UnmanagedHistory", "WorkerReading"]


class MemoryBreakdown:
    """One worker's memory, clipped so that the parts always add up and none is negative.

    Some data arrives with the heartbeat and sizeof() is not exact, so a part can exceed the
    whole; like ``MemoryState`` we force the numbers to add up by definition rather than
    export a negative unmanaged figure.
    """

    __slots__ = ("managed", "process", "spilled", "unmanaged_old")

    process: int
    managed: int
    unmanaged_old: int
    spilled: int

    def __init__(self, *, process: int, managed: int, unmanaged_old: int, spilled: int) -> None:
        self.process = max(0, process)
        self.managed = min(self.process, max(0, managed))
        self.unmanaged_old = min(max(0, unmanaged_old), self.process - self.managed)
        self.spilled = max(0, spilled)

    @property
    def unmanaged(self) -> int:
        """process - managed: old and recent unmanaged memory together (Dask's ``unmanaged``)."""
        return self.process - self.managed

    @property
    def unmanaged_recent(self) -> int:
        """Unmanaged memory that appeared within the recent-to-old window."""
        return self.process - self.managed - self.unmanaged_old

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, MemoryBreakdown):
            return NotImplemented
        return (self.process, self.managed, self.unmanaged_old, self.spilled) == (
            other.process,
            other.managed,
            other.unmanaged_old,
            other.spilled,
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        mib = 2**20
        return (
            f"<MemoryBreakdown process={self.process / mib:.1f} MiB "
            f"managed={self.managed / mib:.1f} MiB "
            f"unmanaged_old={self.unmanaged_old / mib:.1f} MiB "
            f"unmanaged_recent={self.unmanaged_recent / mib:.1f} MiB "
            f"spilled={self.spilled / mib:.1f} MiB>"
        )


@dataclass(frozen=True, slots=True)
class WorkerReading:
    """What one heartbeat tells about a worker's memory (decoded from the scheduler's identity).

    ``managed_total`` is the worker's own count of managed bytes, which includes keys that
    were spilled; ``spilled_memory`` is the in-memory size of those spilled keys and
    ``spilled_disk`` their size on disk. ``device_managed`` is the size of keys a dask-cuda
    worker holds in device memory, which its managed bytes count although they are not in its
    RSS (known only where the ``dask_memory_exporter.gpu`` preload reports it; else 0).
    """

    process: int
    managed_total: int
    spilled_memory: int
    spilled_disk: int
    heartbeat_time: float
    device_managed: int = 0

    @property
    def managed(self) -> int:
        """Managed bytes in RAM, as the scheduler computes it (``nbytes - spilled.memory``),
        less the keys held in device memory where that is known."""
        return max(0, self.managed_total - self.spilled_memory - self.device_managed)

    @property
    def unmanaged_sample(self) -> int:
        """The sample the scheduler appends to the unmanaged history on this heartbeat."""
        return max(0, self.process - self.managed)


class UnmanagedHistory:
    """Sliding-window minimum of unmanaged memory samples, the scheduler's ``unmanaged_old``.

    The scheduler keeps every sample of the window and recomputes ``min()`` when the minimum
    expires; a monotonic deque gives the same minimum in amortised O(1) per sample and keeps
    at most one entry per sample in the window.
    """

    __slots__ = ("_samples", "window")

    def __init__(self, window: float) -> None:
        self.window = window
        # (time, size) with strictly increasing size from left to right: the left is the min.
        self._samples: deque[tuple[float, int]] = deque()

    def add(self, when: float, size: int) -> int:
        """Add a sample taken at ``when`` and return the window's minimum, samples included.

        Like the scheduler, samples older than ``when - window`` are dropped before the new one
        is added, so the result is never empty.
        """
        samples = self._samples
        oldest = when - self.window
        while samples and samples[0][0] < oldest:
            samples.popleft()
        while samples and samples[-1][1] >= size:
            samples.pop()
        samples.append((when, size))
        return samples[0][1]

    @property
    def minimum(self) -> int:
        """The current minimum (0 before any sample)."""
        return self._samples[0][1] if self._samples else 0

    def __len__(self) -> int:
        return len(self._samples)


class MemoryModel:
    """Per-worker memory breakdowns, updated from each poll's readings.

    The scheduler appends one unmanaged sample per heartbeat; a poll may see the same
    heartbeat twice (polling faster than heartbeats) or miss some (polling slower). A sample
    is therefore added only when the heartbeat time changes, and it is stamped with the
    heartbeat time, not the poll time. Workers absent from a poll are forgotten, so a worker
    that leaves (or restarts under a new address) takes its history with it.
    """

    def __init__(self, recent_to_old_time: float) -> None:
        self.recent_to_old_time = recent_to_old_time
        self._histories: dict[str, UnmanagedHistory] = {}
        self._last_heartbeat: dict[str, float] = {}

    def update(
        self,
        readings: Mapping[str, WorkerReading],
        process_override: Mapping[str, int] | None = None,
    ) -> dict[str, MemoryBreakdown]:
        """Fold one poll's readings in and return the breakdown of every worker in it.

        ``process_override`` maps a worker to an RSS read directly from the OS (sidecar mode):
        it replaces the heartbeat's process figure; the difference lands in unmanaged_recent,
        which is where a fresh allocation the scheduler has not heard of belongs.
        """
        for gone in self._histories.keys() - readings.keys():
            del self._histories[gone]
            del self._last_heartbeat[gone]
        out: dict[str, MemoryBreakdown] = {}
        for addr, r in readings.items():
            history = self._histories.get(addr)
            if history is None:
                history = self._histories[addr] = UnmanagedHistory(self.recent_to_old_time)
            if self._last_heartbeat.get(addr) != r.heartbeat_time:
                self._last_heartbeat[addr] = r.heartbeat_time
                history.add(r.heartbeat_time, r.unmanaged_sample)
            process = r.process
            if process_override is not None and addr in process_override:
                process = process_override[addr]
            out[addr] = MemoryBreakdown(
                process=process,
                managed=r.managed,
                unmanaged_old=history.minimum,
                spilled=r.spilled_disk,
            )
        return out

    def __len__(self) -> int:
        return len(self._histories)
