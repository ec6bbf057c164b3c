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
import socket
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from distributed.comm.addressing import parse_address, parse_host_port
from distributed.core import rpc
from distributed.security import Security

from .heartbeat import HEARTBEAT_GAUGES, device_managed, read_heartbeat
from .memory import WorkerReading
from .names import SOURCE_SCHEDULER, Metric
from .source import REASON_TIMEOUT, SourceError, SourceResult, WorkerInfo

__all__ = ["DecodeError", "SchedulerPoll", "SchedulerSource", "WorkerInfo", "decode_identity"]

logger = logging.getLogger(__name__)


REASON_REFUSED = "refused"
REASON_DNS = "dns"
REASON_UNREACHABLE = "unreachable"
REASON_TLS = "tls"
REASON_CLOSED = "closed"
REASON_HANDLER = "handler"
REASON_DECODE = "decode"
REASONS = (
    REASON_REFUSED,
    REASON_DNS,
    REASON_UNREACHABLE,
    REASON_TLS,
    REASON_CLOSED,
    REASON_HANDLER,
    REASON_DECODE,
)
"""Why a fetch failed: the bounded ``reason`` label of the scheduler's error counter."""


def _causes(e: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    cur: BaseException | None = e
    while cur is not None and len(chain) < 10:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    return chain


def _line(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _has_open_comm(r: rpc) -> bool:
    """Whether the rpc still holds a connection that is not closed."""
    comms: Mapping[Any, bool] | tuple[()] = r.comms
    return any(not c.closed() for c in comms)


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
    """A finite, non-negative count of bytes or threads (a negative one is a broken entry)."""
    v = d[key]
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
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
            device_managed=device_managed(metrics),
        )
        name = info.get("name", address)
        nanny = info.get("nanny")
        return WorkerInfo(
            address=address,
            name=str(name),
            host=str(info.get("host", "")),
            nthreads=_int(info, "nthreads") if info.get("nthreads") is not None else 0,
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
        except Exception as e:  # whatever one entry holds, it never hides the others
            skipped += 1
            logger.debug("skipping worker %r: %s", address, e)
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
    reasons: tuple[str, ...] = REASONS

    def __init__(self, address: str, security: Security, timeout: float) -> None:
        self.address = address
        self.timeout = timeout
        self._connection_args = security.get_connection_args("client")
        self._rpc: rpc | None = None

    async def fetch(self, workers: Mapping[str, WorkerInfo] | None = None) -> SourceResult:
        """One ``identity`` round trip, decoded; raises a SourceError naming the cause."""
        poll = await self.fetch_identity()
        return SourceResult(workers=poll.workers, skipped=poll.skipped, values=poll.values)

    async def fetch_identity(self) -> SchedulerPoll:
        """One ``identity`` round trip; raises a SourceError after dropping the connection.

        A new connection is preceded by a plain TCP connect, because distributed's own
        ``connect`` retries a refused or unresolvable address until the timeout: the
        preflight reports those at once. (The scheduler logs one INFO line, "closed before
        handshake completed", per preflight: once per (re)connection, not per poll.)
        """
        if self._rpc is not None and not _has_open_comm(self._rpc):
            # The connection was lost between polls (a scheduler restart): distributed's rpc
            # would reconnect on its own, retrying a refused address until the timeout.
            await self.close()
        if self._rpc is None:
            await self._preflight()
            self._rpc = rpc(
                self.address, timeout=self.timeout, connection_args=self._connection_args
            )
        try:
            identity = await asyncio.wait_for(
                self._rpc.identity(n_workers=-1), timeout=self.timeout
            )
        except BaseException as e:
            # A timed-out or broken call leaves the comm in an unknown state: start afresh.
            await self.close()
            if isinstance(e, Exception):
                raise self._classify(e) from e
            raise
        try:
            return decode_identity(identity)
        except Exception as e:
            raise SourceError(REASON_DECODE, f"malformed identity answer: {e}") from e

    async def _preflight(self) -> None:
        scheme, loc = parse_address(self.address, strict=False)
        if scheme == "gateway":  # dask-gateway's TLS proxy: HOST:PORT/CLUSTER
            loc = loc.partition("/")[0]
        elif scheme not in ("tcp", "tls"):
            return
        host, port = parse_host_port(loc)
        where = f"{host}:{port}"
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port), timeout=self.timeout
            )
        except ConnectionRefusedError:
            raise SourceError(REASON_REFUSED, f"connection refused by {where}") from None
        except socket.gaierror as e:
            raise SourceError(REASON_DNS, f"cannot resolve {host!r}: {e.strerror}") from None
        except asyncio.TimeoutError:
            raise SourceError(
                REASON_TIMEOUT, f"no TCP connection to {where} within {self.timeout:g} s"
            ) from None
        except OSError as e:
            raise SourceError(REASON_UNREACHABLE, f"{where}: {e.strerror or e}") from None
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()

    def _classify(self, e: Exception) -> SourceError:
        """The cause of a failed call, from distributed's exception and its causes."""
        if isinstance(e, SourceError):
            return e
        if isinstance(e, asyncio.TimeoutError):
            return SourceError(
                REASON_TIMEOUT, f"no answer from {self.address} within {self.timeout:g} s"
            )
        chain = _causes(e)
        if any(isinstance(c, ssl.SSLError) or "SSL" in str(c) for c in chain):
            return SourceError(REASON_TLS, f"TLS with {self.address} failed: {_line(e)}")
        if any(isinstance(c, ConnectionRefusedError) for c in chain):
            return SourceError(REASON_REFUSED, f"connection refused by {self.address}")
        if isinstance(e, OSError):  # CommClosedError is one: the scheduler went away
            return SourceError(REASON_CLOSED, f"connection to {self.address} lost: {_line(e)}")
        # Anything else was raised by the scheduler's handler and sent back to us.
        return SourceError(REASON_HANDLER, f"the scheduler's identity handler failed: {_line(e)}")

    async def close(self) -> None:
        """Close the connection (the next fetch reconnects)."""
        r, self._rpc = self._rpc, None
        if r is not None:
            with contextlib.suppress(OSError, asyncio.TimeoutError):
                await asyncio.wait_for(r.close_rpc(), timeout=2)
