"""Gateway mode: one exporter for every cluster a dask-gateway runs.

``GatewayLister`` lists the gateway's running clusters with dask-gateway's own client
(``dask_gateway.Gateway``), which also hands out each cluster's scheduler address (through the
gateway's TLS proxy, ``gateway://``) and its TLS credentials. ``GatewayPoller`` keeps one
``snapshot.Poller`` per cluster, each with its own ``SchedulerSource``, memory model, backoff
and staleness, adds a Poller when a cluster appears and closes it when the cluster is no longer
listed. Every round polls the clusters that are due together and waits for them at most one
budget: a fetch still running then (a slow or hung scheduler) is left in flight and its result
used in a later round, so one slow cluster never delays the others. The round then publishes
one Snapshot whose ``clusters`` hold each cluster's Snapshot; the collector labels their series
with ``cluster``.

What the gateway's API lets a token see: only the clusters of the token's own user (the
listing handler filters by user name; ``admin`` changes nothing). docs/dask-gateway.md says how
to give the exporter's user every cluster. Not here: rendering (``collector.py``), HTTP
(``app.py``), a single scheduler (``app.make_poller``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from typing import Final

import aiohttp
from dask_gateway import Gateway  # also registers the gateway:// comm with distributed
from dask_gateway.auth import BasicAuth, GatewayAuth, JupyterHubAuth
from dask_gateway.client import GatewayServerError
from distributed.security import Security

from .config import read_secret_file
from .memory import MemoryModel
from .names import Metric
from .snapshot import Poller, Snapshot, SourceStatus, classify
from .source import REASON_OTHER, REASON_TIMEOUT, Source, SourceError

__all__ = [
    "GATEWAY_CLUSTERS",
    "GATEWAY_UNUSABLE_CLUSTERS",
    "GATEWAY_UP",
    "SOURCE_GATEWAY",
    "ClusterEntry",
    "GatewayLister",
    "GatewayPoller",
]

logger = logging.getLogger(__name__)

SOURCE_GATEWAY = "gateway"
"""The ``source`` label of the gateway listing's success, duration and error series."""

GATEWAY_UP: Final = Metric(
    "dask_memory_gateway_up", "gauge",
    "1 if the last listing of the dask-gateway's clusters succeeded, else 0 (gateway mode).",
)  # fmt: skip
GATEWAY_CLUSTERS: Final = Metric(
    "dask_memory_gateway_clusters", "gauge",
    "Running clusters exported, as of the last successful listing of the gateway (gateway mode).",
)  # fmt: skip

GATEWAY_UNUSABLE_CLUSTERS: Final = Metric(
    "dask_memory_gateway_unusable_clusters", "gauge",
    "Running clusters the gateway listed that cannot be polled (credentials that do not load).",
)  # fmt: skip

REASON_REFUSED = "refused"
REASON_DNS = "dns"
REASON_UNREACHABLE = "unreachable"
REASON_TLS = "tls"
REASON_AUTH = "auth"
REASON_HTTP = "http"
REASON_DECODE = "decode"
REASON_CREDENTIALS = "credentials"
REASONS = (
    REASON_REFUSED,
    REASON_DNS,
    REASON_UNREACHABLE,
    REASON_TLS,
    REASON_AUTH,
    REASON_HTTP,
    REASON_DECODE,
    REASON_CREDENTIALS,
)
"""Why a listing failed: the bounded ``reason`` label of the gateway's error counter."""

TICK = 0.5
"""Seconds between rounds: Dask's shortest heartbeat interval. A cluster is polled only when
its own Poller says it is due (its heartbeat interval, backoff), the gateway listed only every
``list_interval``."""


@dataclass(frozen=True, slots=True)
class ClusterEntry:
    """One running cluster as the gateway hands it out."""

    name: str
    address: str
    """``gateway://PROXY_HOST:PORT/NAME``: the scheduler through the gateway's TLS proxy."""
    security: Security


class GatewayLister:
    """Lists the running clusters of a gateway with dask-gateway's client.

    The credential file is read again at every listing, so a rotated Kubernetes Secret is
    picked up without a restart.
    """

    def __init__(
        self,
        address: str,
        *,
        proxy_address: str | None,
        auth: str,
        user: str,
        token_file: str,
        timeout: float,
    ) -> None:
        self.address = address
        self.proxy_address = proxy_address
        self.auth_kind = auth
        self.user = user
        self.token_file = token_file
        self.timeout = timeout
        self._gateway: Gateway | None = None

    def _auth(self) -> GatewayAuth:
        try:
            secret = read_secret_file(self.token_file, "--gateway-api-token-file")
        except ValueError as e:
            raise SourceError(REASON_CREDENTIALS, str(e)) from None
        if self.auth_kind == "basic":
            return BasicAuth(self.user, secret)
        return JupyterHubAuth(api_token=secret)

    async def list(self) -> list[ClusterEntry]:
        """The running clusters; raises a SourceError naming the cause."""
        auth = self._auth()
        if self._gateway is None:
            self._gateway = Gateway(
                self.address, proxy_address=self.proxy_address, auth=auth, asynchronous=True
            )
        self._gateway.auth = auth
        try:
            reports = await asyncio.wait_for(
                self._gateway.list_clusters(status="running"), timeout=self.timeout
            )
        except Exception as e:
            await self.close()  # a fresh session (and authentication) next time
            raise self._classify(e) from e
        entries = []
        for r in reports:
            security = r.security
            if r.scheduler_address is None or security is None:
                continue  # not running (any more): no address, no credentials
            entries.append(ClusterEntry(str(r.name), str(r.scheduler_address), security))
        return entries

    def _classify(self, e: Exception) -> SourceError:
        where = self.address
        if isinstance(e, asyncio.TimeoutError):
            return SourceError(REASON_TIMEOUT, f"no answer from {where} within {self.timeout:g} s")
        # Not JSON, or not the listing's shape: --gateway names some other web server.
        if isinstance(e, aiohttp.ContentTypeError | json.JSONDecodeError | KeyError | TypeError):
            return SourceError(REASON_DECODE, f"malformed listing from {where}: {_line(e)}")
        if isinstance(e, aiohttp.ClientResponseError):
            if e.status in (401, 403):
                return SourceError(
                    REASON_AUTH, f"{where} refused the credential (HTTP {e.status}): {e.message}"
                )
            return SourceError(REASON_HTTP, f"{where} answered HTTP {e.status}: {e.message}")
        if isinstance(e, GatewayServerError | ValueError):  # the client's 404, 422 and 500
            return SourceError(REASON_HTTP, f"{where} failed: {_line(e)}")
        if isinstance(e, aiohttp.ClientSSLError | ssl.SSLError):
            return SourceError(REASON_TLS, f"TLS with {where} failed: {_line(e)}")
        if isinstance(e, aiohttp.ClientConnectorError):
            cause = e.os_error
            if isinstance(cause, ConnectionRefusedError):
                return SourceError(REASON_REFUSED, f"connection refused by {where}")
            if isinstance(cause, socket.gaierror):
                return SourceError(REASON_DNS, f"cannot resolve {where}: {cause.strerror}")
            return SourceError(REASON_UNREACHABLE, f"{where}: {_line(e)}")
        if isinstance(e, aiohttp.ClientError | OSError):
            return SourceError(REASON_UNREACHABLE, f"{where}: {_line(e)}")
        return SourceError(REASON_OTHER, f"listing {where} failed: {_line(e)}")

    async def close(self) -> None:
        gw, self._gateway = self._gateway, None
        if gw is not None:
            with contextlib.suppress(Exception):
                await gw.close()


def _line(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


async def _discard(snapshot: Snapshot) -> None:
    """A cluster's Poller publishes nothing itself: the round publishes all clusters at once."""


class GatewayPoller:
    """One Poller per running cluster of a gateway, polled in rounds under one budget.

    ``make_source`` builds a cluster's roster source (a SchedulerSource on its
    ``gateway://`` address with its credentials). While the gateway cannot be listed, the
    clusters last listed stay and are polled on: each one's own ``scheduler_up`` says whether
    it still answers. A cluster no longer listed is dropped with its series at once.
    """

    def __init__(
        self,
        lister: GatewayLister,
        make_source: Callable[[ClusterEntry], Source],
        recent_to_old_time: float,
        thresholds: Mapping[str, float],
        publish: Callable[[Snapshot], Awaitable[None]],
        *,
        list_interval: float = 5.0,
        min_interval: float = 0.0,
        max_backoff: float = 30.0,
        stale_after: float | None = None,
        budget: float = TICK,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.lister = lister
        self.make_source = make_source
        self.recent_to_old_time = recent_to_old_time
        self.thresholds = dict(thresholds)
        self.publish = publish
        self.list_interval = list_interval
        self.min_interval = min_interval
        self.max_backoff = max_backoff
        self.stale_after = stale_after
        self.budget = budget
        self.clock = clock
        self.pollers: dict[str, Poller] = {}
        self.due: dict[str, float] = {}  # monotonic time each cluster's next poll is due
        self._listing: asyncio.Task[list[ClusterEntry]] | None = None
        self._list_started = 0.0
        self._list_at = 0.0  # monotonic
        self._list_failures = 0
        self._list_errors: dict[str, int] = dict.fromkeys(
            (*REASONS, REASON_TIMEOUT, REASON_OTHER), 0
        )
        self._list_status: SourceStatus | None = None
        self._listed_once = False
        self._last_list_success: float | None = None  # unix time
        self._unusable: set[str] = set()  # listed clusters whose source could not be made
        self.snapshot = Snapshot(time=clock(), thresholds=self.thresholds, has_scheduler=False)

    def _new_poller(self, entry: ClusterEntry) -> Poller:
        return Poller(
            [self.make_source(entry)],
            MemoryModel(self.recent_to_old_time),
            self.thresholds,
            _discard,
            min_interval=self.min_interval,
            max_backoff=self.max_backoff,
            stale_after=self.stale_after,
            clock=self.clock,
        )

    async def _list(self) -> bool:
        """Start a listing when due, wait for it up to the budget; apply it when done.

        Returns True when a listing completed in this round."""
        if self._listing is None and time.monotonic() >= self._list_at:
            self._list_started = time.perf_counter()
            self._listing = asyncio.create_task(self.lister.list())
        if self._listing is None:
            return False
        if not self._listing.done():
            await asyncio.wait({self._listing}, timeout=self.budget)
        if not self._listing.done():
            return False
        task, self._listing = self._listing, None
        duration = time.perf_counter() - self._list_started
        error = task.exception()
        if error is None:
            if self._list_failures:
                logger.info("gateway listing works again after %d failures", self._list_failures)
            self._list_failures = 0
            self._listed_once = True
            self._last_list_success = self.clock()
            self._list_at = time.monotonic() + self.list_interval
            await self._apply(task.result())
        else:
            reason, why = classify(error)
            if reason not in self._list_errors:
                reason = REASON_OTHER
            self._list_failures += 1
            self._list_errors[reason] += 1
            backoff = min(self.max_backoff, 0.5 * 2.0 ** min(self._list_failures, 16))
            self._list_at = time.monotonic() + backoff * random.uniform(0.8, 1.0)
            level = logging.WARNING if self._list_failures == 1 else logging.DEBUG
            logger.log(level, "gateway listing failed (%s): %s", reason, why)
        self._list_status = SourceStatus(
            SOURCE_GATEWAY, error is None, duration, tuple(self._list_errors.items())
        )
        return True

    async def _apply(self, entries: list[ClusterEntry]) -> None:
        """Add a Poller per new cluster, close those of clusters no longer listed."""
        listed = {e.name: e for e in entries}
        for name in [n for n in self.pollers if n not in listed]:
            logger.info("cluster %s is gone from the gateway: its series go", name)
            poller = self.pollers.pop(name)
            self.due.pop(name, None)
            await poller.close()
        unusable: set[str] = set()
        for name, entry in listed.items():
            if name in self.pollers:
                continue
            try:  # a source loads the cluster's credentials: a bad one skips this cluster only
                poller = self._new_poller(entry)
            except Exception as e:
                unusable.add(name)
                if name not in self._unusable:  # once per cluster, not at every listing
                    logger.warning("cluster %s cannot be polled: %s", name, _line(e))
                continue
            logger.info("cluster %s found on the gateway: polling %s", name, entry.address)
            self.pollers[name] = poller
            self.due[name] = 0.0
        self._unusable = unusable

    async def poll_once(self) -> Snapshot | None:
        """One round: list when due, poll the clusters that are due, publish if anything
        changed. Returns the new Snapshot, or None when nothing was due."""
        start = time.perf_counter()
        listed = await self._list()
        now = time.monotonic()
        due = [
            (name, p)
            for name, p in self.pollers.items()
            if now >= self.due.get(name, 0.0) or p.fetch_done
        ]
        if due:
            await asyncio.gather(*(p.poll_once(budget=self.budget) for _, p in due))
            after = time.monotonic()
            for name, p in due:
                self.due[name] = after + max(0.0, p.next_delay() - self.budget)
        if not due and not listed and self.snapshot.polls_total:
            return None
        snap = self._build(start)
        self.snapshot = snap
        await self.publish(snap)
        return snap

    def _build(self, start: float) -> Snapshot:
        prev = self.snapshot
        clusters = {name: self.pollers[name].snapshot for name in sorted(self.pollers)}
        up = self._list_status is not None and self._list_status.success
        gauges: dict[Metric, float] = {GATEWAY_UP: 1.0 if up else 0.0}
        if self._listed_once:
            gauges[GATEWAY_CLUSTERS] = float(len(clusters))
            gauges[GATEWAY_UNUSABLE_CLUSTERS] = float(len(self._unusable))
        return replace(
            prev,
            time=self.clock(),
            clusters=clusters,
            polled=self._listed_once,
            sources=(self._list_status,) if self._list_status is not None else (),
            source_gauges=gauges,
            poll_duration=time.perf_counter() - start,
            last_success=self._last_list_success,
            polls_total=prev.polls_total + 1,
        )

    async def run(self) -> None:
        """Poll until cancelled."""
        try:
            while True:
                started = time.monotonic()
                try:
                    await self.poll_once()
                except Exception as e:  # a bug: keep serving the others, say so once a round
                    logger.warning("gateway round failed: %s", _line(e))
                    logger.debug("gateway round failure", exc_info=e)
                await asyncio.sleep(max(0.0, TICK - (time.monotonic() - started)))
        finally:
            await self.close()

    async def close(self) -> None:
        if self._listing is not None:
            self._listing.cancel()
            await asyncio.gather(self._listing, return_exceptions=True)
            self._listing = None
        for poller in self.pollers.values():
            await poller.close()
        self.pollers.clear()
        await self.lister.close()
