"""SidecarSource: a worker sidecar's own data, at no cost to the scheduler.

A ``--mode local`` sidecar used to fetch the scheduler's ``identity`` for the whole cluster on
every poll, to learn its own workers' addresses and heartbeats: with one sidecar per worker
pod that is N full answers per heartbeat interval, quadratic in the cluster's size (about 40%
of a scheduler core at 200 workers, ``benchmarks/sidecar_cost.py``). Now a worker sidecar
makes no scheduler call at all. It exports what only it can see, and what stays live while a
worker's event loop is blocked:

- the direct RSS of the worker processes beside it (``process.LocalProcessSource``: found by
  the ``dask worker`` command line, named by its ``--name``);
- an event-loop probe of its own worker: the latency of an HTTP request to the worker's own
  dashboard (``/health``), answered by the worker's event loop, so it stops answering while a
  task holds the GIL or the loop is otherwise blocked. An unanswered probe counts up, like a
  heartbeat age, from the moment it was sent.

The memory breakdown (managed, unmanaged, spilled) still comes from the one scheduler-mode
exporter of the cluster; recording rules join the two by ``worker_name``
(``rules.py``, docs/sidecar.md). This module reads no settings and knows nothing of HTTP
serving.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import replace

import aiohttp

from .names import SOURCE_LOCAL, WORKER_EVENT_LOOP_PROBE_SECONDS, Metric
from .process import REASON_UNREADABLE, LocalProcessSource
from .source import SourceResult, WorkerInfo

__all__ = ["EventLoopProbe", "SidecarSource"]

logger = logging.getLogger(__name__)

_WAIT_FOR_ANSWER = 0.5
"""How long one fetch waits for a probe's answer before reporting its age so far."""


class EventLoopProbe:
    """Probes one URL served by a worker's event loop; one request in flight at a time.

    ``seconds()`` is the last answer's latency, or the age of the oldest unanswered request if
    that is larger: it keeps climbing through a stall even across request timeouts, and
    drops back with the first answer. A refused or failed connection (the worker is not
    there, or restarting) means no value: the series is absent, never a made-up figure.
    """

    def __init__(
        self,
        url: str,
        timeout: float,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self.timeout = timeout
        self.clock = clock
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[float | None] | None = None
        self._waiting_since: float | None = None
        """When the oldest request not yet answered was sent (None: all answered)."""
        self._last: float | None = None
        self._warned = False

    async def _request(self) -> float | None:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        started = self.clock()
        try:
            async with self._session.get(self.url, allow_redirects=False) as r:
                await r.read()
        except asyncio.TimeoutError:
            raise
        except (aiohttp.ClientError, OSError) as e:
            if not self._warned:
                self._warned = True
                logger.warning("event-loop probe %s failed: %s", self.url, e)
            return None
        if self._warned:
            logger.info("event-loop probe %s answers again", self.url)
            self._warned = False
        return self.clock() - started

    async def seconds(self) -> float | None:
        """Start a probe unless one is in flight; the figure as of now."""
        if self._task is None:
            if self._waiting_since is None:
                self._waiting_since = self.clock()
            self._task = asyncio.create_task(self._request())
        await asyncio.wait({self._task}, timeout=_WAIT_FOR_ANSWER)
        if self._task.done():
            task, self._task = self._task, None
            error = task.exception()
            if isinstance(error, asyncio.TimeoutError):
                pass  # unanswered within its timeout: the wait goes on, a new request follows
            elif error is not None:
                logger.debug("event-loop probe failed", exc_info=error)
                self._waiting_since, self._last = None, None
            else:
                self._waiting_since, self._last = None, task.result()
        if self._waiting_since is None:
            return self._last
        age = self.clock() - self._waiting_since
        return max(age, self._last or 0.0)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._session is not None:
            await self._session.close()
            self._session = None


class SidecarSource:
    """Direct RSS of the worker processes beside the exporter, plus the event-loop probe.

    The probe's value goes to the one worker process beside the exporter (the usual pod of
    one ``dask worker``); with several it cannot say whose loop it measured and is left out
    (one warning).
    """

    name = SOURCE_LOCAL
    roster = False
    reasons: tuple[str, ...] = (REASON_UNREADABLE,)

    def __init__(self, local: LocalProcessSource, probe: EventLoopProbe | None = None) -> None:
        self.local = local
        self.probe = probe
        self.families: tuple[Metric, ...] = (
            *local.families,
            *((WORKER_EVENT_LOOP_PROBE_SECONDS,) if probe is not None else ()),
        )
        self._warned_several = False

    async def fetch(self, workers: Mapping[str, WorkerInfo]) -> SourceResult:
        result = await self.local.fetch(workers)
        if self.probe is None:
            return result
        seconds = await self.probe.seconds()
        if seconds is None:
            return result
        return self._attach(result, seconds)

    def _attach(self, result: SourceResult, seconds: float) -> SourceResult:
        values = {WORKER_EVENT_LOOP_PROBE_SECONDS: seconds}
        found = len(result.rss) + len(result.local_only)
        if found != 1:
            if found > 1 and not self._warned_several:
                self._warned_several = True
                logger.warning(
                    "%d worker processes beside the exporter: the event-loop probe cannot "
                    "tell whose loop it measures and is not exported",
                    found,
                )
            return result
        if result.rss:
            addr = next(iter(result.rss))
            return replace(
                result, values={**result.values, addr: {**result.values.get(addr, {}), **values}}
            )
        p = result.local_only[0]
        return replace(result, local_only=(replace(p, values={**p.values, **values}),))

    async def close(self) -> None:
        await self.local.close()
        if self.probe is not None:
            await self.probe.close()
