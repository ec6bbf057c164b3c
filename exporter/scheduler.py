"""SchedulerSource: per-worker heartbeat readings, fetched from the scheduler over Dask's comm.

It calls the scheduler's ``identity`` handler (``n_workers=-1``: every worker) through
distributed's ``rpc``. It deliberately does not register a Client (that would show up as a
client and hold futures), does not use ``run_on_scheduler`` (every call lands in the
scheduler's event log) and does not use ``/json/identity.json`` (HTTP 500 whenever a heartbeat
carries tuple-keyed task digests). Decoding is strict per worker and lenient per poll: one
malformed worker entry is skipped and counted, the others are still exported.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from distributed.core import rpc
from distributed.security import Security

from .heartbeat import HEARTBEAT_GAUGES, read_heartbeat
from .memory import WorkerReading
from .names import SOURCE_SCHEDULER, Metric
from .source import SourceResult, WorkerInfo

__all__ = ["DecodeError", "SchedulerPoll", "SchedulerSource", "WorkerInfo", "decode_identity"]

logger = logging.getLogger(__name__)


class DecodeError(ValueError):
    """A worker entry lacks a field the exporter needs, or has one of the wrong type."""


@dataclass(frozen=True, slots=True)
class SchedulerPoll:
    """The decoded answer of one ``identity`` call."""

    scheduler_address: str
    workers: dict[str, WorkerInfo]
    skipped: int
    values: dict[str, dict[Metric, float]] = field(default_factory=dict)
    """Per worker, the heartbeat gauges it reports (``heartbeat.HEARTBEAT_GAUGES``)."""


def _int(d: Mapping[str, Any], key: str) -> int:
    v = d[key]
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise DecodeError(f"{key}={v!r}")
    return int(v)


def _float(d: Mapping[str, Any], key: str) -> float:
    v = d[key]
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise DecodeError(f"{key}={v!r}")
    return float(v)


def decode_worker(address: str, info: Mapping[str, Any]) -> WorkerInfo:
    """Decode one entry of ``identity()["workers"]``; raise DecodeError if it is unusable."""
    try:
        metrics = info["metrics"]
        spilled = metrics["spilled_bytes"]
        limit = info.get("memory_limit")
        last_seen = _float(info, "last_seen")
        reading = WorkerReading(
            process=_int(metrics, "memory"),
            managed_total=_int(metrics, "managed_bytes"),
            spilled_memory=_int(spilled, "memory"),
            spilled_disk=_int(spilled, "disk"),
            heartbeat_time=last_seen,
        )
        name = info.get("name", address)
        nanny = info.get("nanny")
        return WorkerInfo(
            address=address,
            name=str(name),
            host=str(info.get("host", "")),
            nthreads=int(info.get("nthreads") or 0),
            memory_limit=_int(info, "memory_limit") if limit else None,
            status=str(info.get("status", "")),
            last_seen=last_seen,
            nanny=str(nanny) if nanny else None,
            reading=reading,
        )
    except DecodeError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise DecodeError(f"{type(e).__name__}: {e}") from None


def decode_identity(identity: Mapping[str, Any]) -> SchedulerPoll:
    """Decode a scheduler identity, skipping (and counting) malformed worker entries."""
    raw = identity.get("workers")
    if not isinstance(raw, Mapping):
        raise DecodeError("identity has no 'workers' mapping")
    workers: dict[str, WorkerInfo] = {}
    values: dict[str, dict[Metric, float]] = {}
    skipped = 0
    for address, info in raw.items():
        try:
            workers[str(address)] = decode_worker(str(address), info)
        except DecodeError as e:
            skipped += 1
            logger.debug("skipping worker %s: %s", address, e)
            continue
        if HEARTBEAT_GAUGES:
            values[str(address)] = read_heartbeat(info["metrics"])
    return SchedulerPoll(
        scheduler_address=str(identity.get("address", "")),
        workers=workers,
        skipped=skipped,
        values=values,
    )


class SchedulerSource:
    """The roster source: worker identity from one scheduler, one comm kept open between polls.

    Besides the roster it owns the heartbeat gauges of ``heartbeat.HEARTBEAT_GAUGES``.
    """

    name = SOURCE_SCHEDULER
    roster = True
    families: tuple[Metric, ...] = tuple(g.metric for g in HEARTBEAT_GAUGES)

    def __init__(self, address: str, security: Security, timeout: float) -> None:
        self.address = address
        self.timeout = timeout
        self._connection_args = security.get_connection_args("client")
        self._rpc: rpc | None = None

    async def fetch(self, workers: Mapping[str, WorkerInfo] | None = None) -> SourceResult:
        """One ``identity`` round trip, decoded; raises on any failure."""
        poll = await self.fetch_identity()
        return SourceResult(workers=poll.workers, skipped=poll.skipped, values=poll.values)

    async def fetch_identity(self) -> SchedulerPoll:
        """One ``identity`` round trip; raises on any failure after dropping the connection."""
        if self._rpc is None:
            self._rpc = rpc(
                self.address, timeout=self.timeout, connection_args=self._connection_args
            )
        try:
            identity = await asyncio.wait_for(
                self._rpc.identity(n_workers=-1), timeout=self.timeout
            )
        except BaseException:
            # A timed-out or broken call leaves the comm in an unknown state: start afresh.
            await self.close()
            raise
        return decode_identity(identity)

    async def close(self) -> None:
        """Close the connection (the next fetch reconnects)."""
        r, self._rpc = self._rpc, None
        if r is not None:
            with contextlib.suppress(OSError, asyncio.TimeoutError):
                await asyncio.wait_for(r.close_rpc(), timeout=2)
