"""Scheduler-side worker entries (``WorkerInfo``) written as plain data for unit tests."""

from __future__ import annotations

from dask_memory_exporter.memory import WorkerReading
from dask_memory_exporter.scheduler import WorkerInfo

__all__ = ["NOW", "MiB", "info", "workers"]

MiB = 2**20
NOW = 10_000.0


def info(
    address: str,
    name: str | None = None,
    *,
    nanny: str | None = "auto",
    nthreads: int = 1,
    limit: int | None = 300 * MiB,
    last_seen: float = NOW,
    process: int = 100 * MiB,
) -> WorkerInfo:
    """A running worker at ``address``; ``nanny="auto"`` puts its nanny on port 9<last 3 digits>."""
    bracketed = address.split("://")[1].rsplit(":", 1)[0]
    host = bracketed.strip("[]")
    return WorkerInfo(
        address=address,
        name=name or address,
        host=host,
        nthreads=nthreads,
        memory_limit=limit,
        status="running",
        last_seen=last_seen,
        nanny=f"tcp://{bracketed}:9{address[-3:]}" if nanny == "auto" else nanny,
        reading=WorkerReading(process, 10 * MiB, 0, 0, last_seen),
    )


def workers(*ws: WorkerInfo) -> dict[str, WorkerInfo]:
    """{address: entry}, as the scheduler reports them."""
    return {w.address: w for w in ws}
