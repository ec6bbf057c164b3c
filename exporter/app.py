"""The HTTP server: ``/metrics``, ``/healthz``, ``/readyz`` and a landing page at ``/``.

Handlers only read the current Exposition, rendered once per poll by the Poller's publish
callback; none of them ever calls the scheduler, so a slow or dead scheduler never blocks a
scrape. The Poller task is owned by a cleanup context: started before the app serves,
cancelled and awaited when it stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

from aiohttp import web
from prometheus_client.registry import Collector

from .collector import (
    OPENMETRICS_CONTENT_TYPE,
    TEXT_CONTENT_TYPE,
    Exposition,
    cluster_parts,
    package_version,
)
from .config import Settings
from .events import EventsSource
from .gateway import ClusterEntry, GatewayLister, GatewayPoller
from .gpu_nvml import NvmlReader
from .memory import MemoryModel
from .names import SOURCE_LOCAL, Metric
from .negotiation import wants_gzip, wants_openmetrics
from .picture import render_snapshot
from .probe import EventLoopProbe, SidecarSource
from .process import LocalProcessSource, use_proc_root
from .remediate import REMEDIATOR, WEBHOOK_PATH, Remediator, install
from .runbooks import PATH as RUNBOOKS_PATH
from .runbooks import page as runbooks_page
from .scheduler import SchedulerSource
from .snapshot import Poller, Snapshot
from .source import Source
from .webconfig import UNAUTHENTICATED_PATHS, WEB_CONFIG, www_authenticate

__all__ = ["ExporterState", "make_app", "make_poller", "make_sources"]

logger = logging.getLogger(__name__)
SERVER_HEADER = f"dask-memory-exporter/{package_version('dask-memory-exporter')}"
# The landing page has no script and no external resource: only its inline <style>.
CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; "
    "form-action 'none'; frame-ancestors 'none'"
)
VARY = "Accept, Accept-Encoding"


class ExporterState:
    """The current Exposition, swapped atomically after each poll, and what the Poller polls.

    ``collectors`` are rendered beside the Snapshot's families: counters that change between
    polls (remediation), re-rendered with :meth:`republish`. ``sources``: the sources to poll,
    None for those the settings ask for.
    """

    def __init__(
        self,
        settings: Settings,
        collectors: Sequence[Collector] = (),
        sources: Sequence[Source] | None = None,
    ) -> None:
        self.settings = settings
        self._keep = settings.metric_filter()
        self.collectors = tuple(collectors)
        self.sources = None if sources is None else tuple(sources)
        self._latest = Snapshot(
            time=time.time(),
            thresholds=settings.thresholds,
            has_scheduler=settings.scheduler is not None and settings.mode != "local",
        )
        self._render_lock = asyncio.Lock()
        self.exposition = self._render(self._latest)
        self.poller: Poller | GatewayPoller | None = None

    def _render(self, snapshot: Snapshot) -> Exposition:
        return Exposition.render(
            snapshot,
            process_metrics=self.settings.process_metrics,
            collectors=self.collectors,
            keep=self._keep,
            totals_only=self.settings.cluster_totals_only,
        )

    async def publish(self, snapshot: Snapshot) -> None:
        """Render off the event loop, then swap: scrapes keep getting the previous bytes.

        One render at a time, always of the latest Snapshot, so a republish never puts an
        older poll back.
        """
        self._latest = snapshot
        await self.republish()

    async def republish(self) -> None:
        """Render the latest Snapshot again (the collectors changed)."""
        async with self._render_lock:
            self.exposition = await asyncio.to_thread(self._render, self._latest)

    @property
    def snapshot(self) -> Snapshot:
        return self.exposition.snapshot


STATE = web.AppKey("state", ExporterState)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def make_sources(settings: Settings) -> list[Source]:
    """The sources these settings ask for.

    Mode ``scheduler``: the scheduler only (its roster, and its event log unless ``events``
    is off; so in mode ``both``). ``local``: the worker processes beside the
    exporter and the event-loop probe, with no scheduler call (a scheduler address only
    picks out its own ``dask worker`` processes). ``both``: every worker the scheduler
    knows, with direct RSS for the local ones. (With a gateway, the sources come and go
    with its clusters: ``make_gateway_poller``.)
    """
    sources: list[Source] = []
    if settings.scheduler and settings.mode != "local":
        # A worker sidecar (mode local) never calls the scheduler: N sidecars would cost it
        # N whole-cluster answers per heartbeat (docs/sidecar.md, "Scaling").
        sources.append(SchedulerSource(settings.scheduler, settings.security(), settings.timeout))
    # Outcomes are cluster-wide: not in mode local, which exports only the workers beside it
    # (one sidecar per worker pod would count every kill once per pod).
    if settings.scheduler and settings.events and settings.mode != "local":
        sources.append(
            EventsSource(
                settings.scheduler,
                settings.security(),
                settings.timeout,
                log_length=settings.event_log_length,
            )
        )
    if settings.mode != "scheduler":
        use_proc_root(settings.proc_root)  # psutil reads one procfs for the whole process
        gpu = NvmlReader.open() if settings.nvml else None
        local = LocalProcessSource(
            settings.proc_root, scheduler_address=settings.scheduler, gpu=gpu
        )
        probe = None
        if settings.worker_probe_url:
            probe = EventLoopProbe(settings.worker_probe_url, settings.timeout)
        sources.append(SidecarSource(local, probe))
    return sources


def make_poller(
    settings: Settings, state: ExporterState, sources: Sequence[Source] | None = None
) -> Poller | GatewayPoller:
    """The Poller publishing into ``state``: of ``sources``, or of those the settings ask for
    (with a gateway: one Poller per cluster it lists)."""
    if settings.gateway and sources is None:
        return make_gateway_poller(settings, state)
    return Poller(
        make_sources(settings) if sources is None else sources,
        MemoryModel(settings.recent_to_old_time),
        settings.thresholds,
        state.publish,
        local_workers_only=settings.mode == "local",
        min_interval=settings.poll_interval,
        max_backoff=settings.max_backoff,
        stale_after=settings.stale_after,
    )


def make_gateway_poller(settings: Settings, state: ExporterState) -> GatewayPoller:
    """One Poller per cluster the gateway lists, through the gateway's proxy."""
    assert settings.gateway and settings.gateway_api_token_file
    lister = GatewayLister(
        settings.gateway,
        proxy_address=settings.gateway_proxy_address,
        auth=settings.gateway_auth,
        user=settings.gateway_user,
        token_file=settings.gateway_api_token_file,
        timeout=settings.timeout,
    )

    def source(entry: ClusterEntry) -> Source:
        return SchedulerSource(entry.address, entry.security, settings.timeout)

    return GatewayPoller(
        lister,
        source,
        settings.recent_to_old_time,
        settings.thresholds,
        state.publish,
        list_interval=settings.gateway_list_interval,
        min_interval=settings.poll_interval,
        max_backoff=settings.max_backoff,
        stale_after=settings.stale_after,
    )


def make_app(settings: Settings, sources: Sequence[Source] | None = None) -> web.Application:
    """Build the aiohttp application; polling starts when the app starts.

    ``sources``: the sources to poll, instead of those the settings ask for (the scheduler
    preload hands over its in-process source). With ``--remediate``, the Alertmanager
    webhook too (ConfigError if its token file is unusable).
    """
    app = web.Application(middlewares=[_basic_auth])
    remediator: Remediator | None = None
    if settings.remediate:
        remediator = Remediator(settings, lambda: state.snapshot)
    state = ExporterState(settings, [remediator.stats] if remediator else [], sources)
    app[STATE] = state
    if remediator is not None:
        remediator.on_counted = state.republish
        install(app, remediator)
    app.router.add_get("/", landing)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get(RUNBOOKS_PATH, runbooks)
    app.on_response_prepare.append(_server_header)
    app.cleanup_ctx.append(_run_poller)
    return app


async def _run_poller(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    state.poller = make_poller(state.settings, state, state.sources)
    task = asyncio.create_task(state.poller.run(), name="dask-memory-exporter-poller")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


@web.middleware
async def _basic_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Basic auth from the web configuration file, if it names users; probes are exempt, and
    so is the remediation webhook, which requires its own bearer token (Alertmanager sends
    one Authorization header: basic or bearer, not both)."""
    watcher = request.app.get(WEB_CONFIG)
    if (
        watcher is None
        or not watcher.auth_required
        or request.path in UNAUTHENTICATED_PATHS
        or (request.path == WEBHOOK_PATH and REMEDIATOR in request.app)
        or await watcher.authorized(request.headers.get("Authorization"))
    ):
        return await handler(request)
    return web.Response(
        status=401,
        text="401 Unauthorized\n",
        headers={"WWW-Authenticate": www_authenticate()},
    )


async def _server_header(request: web.Request, response: web.StreamResponse) -> None:
    """Headers on every response: name/version, no MIME sniffing, a strict CSP on HTML."""
    response.headers["Server"] = SERVER_HEADER
    response.headers["X-Content-Type-Options"] = "nosniff"
    if response.content_type == "text/html":
        response.headers["Content-Security-Policy"] = CSP


async def metrics(request: web.Request) -> web.Response:
    """Cached exposition; OpenMetrics when preferred, gzip when accepted (q-values honoured)."""
    expo = request.app[STATE].exposition
    openmetrics = wants_openmetrics(request.headers.get("Accept"))
    gz = wants_gzip(request.headers.get("Accept-Encoding"))
    if openmetrics:
        body = expo.openmetrics_gzip if gz else expo.openmetrics
        ctype = OPENMETRICS_CONTENT_TYPE
    else:
        body = expo.text_gzip if gz else expo.text
        ctype = TEXT_CONTENT_TYPE
    resp = web.Response(body=body, headers={"Content-Type": ctype, "Vary": VARY})
    if gz:
        resp.headers["Content-Encoding"] = "gzip"
    return resp


async def healthz(request: web.Request) -> web.Response:
    """Alive: the event loop answers."""
    return web.Response(text="ok\n")


async def readyz(request: web.Request) -> web.Response:
    """Ready: one poll done and the scheduler reachable at the last poll.

    In mode ``local`` the worker processes' RSS is the point: ready once the process table
    was read, whether or not the scheduler answers (``scheduler_up`` reports that).
    """
    state = request.app[STATE]
    snap = state.snapshot
    if state.settings.gateway:
        if snap.polled and all(s.success for s in snap.sources):
            return web.Response(text="ready\n")
        reason = "gateway unreachable" if snap.polled else "gateway not listed yet"
        return web.Response(status=503, text=f"not ready: {reason}\n")
    if state.settings.mode == "local":
        if any(s.name == SOURCE_LOCAL and s.success for s in snap.sources):
            return web.Response(text="ready\n")
        return web.Response(status=503, text="not ready: local processes not read yet\n")
    if snap.polled and snap.scheduler_up:
        return web.Response(text="ready\n")
    reason = "scheduler unreachable" if snap.polled else "no successful poll yet"
    return web.Response(status=503, text=f"not ready: {reason}\n")


async def runbooks(request: web.Request) -> web.Response:
    """docs/runbooks.md as HTML: where the alerts' runbook links point by default."""
    return web.Response(text=runbooks_page(), content_type="text/html")


def _mib(v: float | None) -> str:
    return "" if v is None else f"{v / 2**20:,.1f}"


def _cell(metric: Metric, v: float | None) -> str:
    if v is None:
        return ""
    if metric.unit == "bytes":
        return _mib(v)
    return f"{v:g}"


def _column(metric: Metric) -> str:
    """A column heading from a family's declaration, MiB for bytes."""
    title = metric.heading.lower()
    return f"{title} MiB" if metric.unit == "bytes" else title


async def landing(request: web.Request) -> web.Response:
    """A small page with links, a picture of each worker's memory and a per-worker table.

    Refreshed by the browser every 5 s (meta refresh): no script, so the strict CSP holds.
    """
    state = request.app[STATE]
    snap = state.snapshot
    esc = html.escape
    # Columns that cannot be filled are left out: direct RSS exists only in the sidecar
    # modes, and a source's own family only where some worker reports it.
    clustered = bool(state.settings.gateway)
    parts = cluster_parts(snap)
    workers = sorted(
        ((name, w, s) for name, s in parts for w in s.workers),
        key=lambda t: (t[0], t[1].info.name),
    )
    families = dict.fromkeys(m for _, s in parts for m in s.families)
    with_rss = any(w.rss is not None for _, w, _ in workers) or bool(snap.local_only)
    extra = [m for m in families if any(m in w.values for _, w, _ in workers)]
    rows = []
    for cluster, w, wsnap in workers:
        info, mem = w.info, w.memory
        share = f"{mem.process / info.memory_limit:.0%}" if info.memory_limit else ""
        cells = [
            *([esc(cluster)] if clustered else []),
            esc(info.name), esc(info.address), esc(info.status),
            _mib(mem.process), _mib(mem.managed), _mib(mem.unmanaged_old),
            _mib(mem.unmanaged_recent), _mib(mem.spilled), _mib(info.memory_limit), share,
            f"{max(0.0, wsnap.time - info.last_seen):.1f}",
            *([_mib(w.rss)] if with_rss else []),
            *(_cell(m, w.values.get(m)) for m in extra),
        ]  # fmt: skip
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    heads = [
        *(["cluster"] if clustered else []),
        "name", "address", "status", "process MiB", "managed MiB", "unmanaged MiB",
        "unmanaged recent MiB", "spilled MiB", "limit MiB", "of limit", "heartbeat age s",
        *(["RSS from the OS MiB"] if with_rss else []), *(_column(m) for m in extra),
    ]  # fmt: skip
    local_extra = [m for m in snap.families if any(m in p.values for p in snap.local_only)]
    local_rows = "".join(
        f"<tr><td>{esc(p.name)}</td><td>{p.pid}</td><td>{_mib(p.rss)}</td>"
        + "".join(f"<td>{_cell(m, p.values.get(m))}</td>" for m in local_extra)
        + "</tr>"
        for p in sorted(snap.local_only, key=lambda p: p.name)
    )
    local_heads = "".join(f"<th>{esc(_column(m))}</th>" for m in local_extra)
    local_title = (
        "Worker processes the scheduler has not reported"
        if snap.has_scheduler
        else "Worker processes beside the exporter"
    )
    local_table = (
        f"<h2>{local_title}</h2>\n"
        f"<table><tr><th>name</th><th>pid</th><th>RSS from the OS MiB</th>{local_heads}</tr>"
        f"{local_rows}</table>"
        if local_rows
        else ""
    )
    up = "up" if snap.scheduler_up else "DOWN"
    scheduler = (
        f"Scheduler {esc(state.settings.scheduler or '')}: <b>{up}</b>; "
        if snap.has_scheduler
        else ""
    )
    if clustered:
        listed = "up" if snap.polled and all(s.success for s in snap.sources) else "DOWN"
        down = sum(1 for _, s in parts if not s.scheduler_up)
        scheduler = (
            f"Gateway {esc(state.settings.gateway or '')}: <b>{listed}</b>; "
            f"{len(snap.clusters)} clusters ({down} unreachable); "
        )
    sources = ", ".join(
        f"{esc(s.name)} {'ok' if s.success else 'FAILING'} ({s.errors_total} errors)"
        for s in snap.sources
    )
    # one picture per cluster (with its own total and thresholds) in gateway mode
    pictures = "".join(
        (f"<h2>{esc(name)}</h2>\n" if clustered else "") + render_snapshot(part)
        for name, part in parts
        if part.workers
    )
    body = f"""<!doctype html>
<html><head><meta charset="utf-8"><meta http-equiv="refresh" content="5">
<title>Dask memory exporter</title>
<style>body{{font-family:sans-serif}}td,th{{padding:2px 8px;text-align:right}}</style>
</head><body>
<h1>Dask memory exporter</h1>
<p><a href="/metrics">Metrics</a> · <a href="/healthz">Health</a> ·
<a href="/readyz">Readiness</a> · <a href="/runbooks">Runbooks</a></p>
<p>{scheduler}{len(workers)} workers; {snap.polls_total} polls; sources: {sources}.</p>
{pictures}
<table><tr>{"".join(f"<th>{h}</th>" for h in heads)}</tr>
{"".join(rows)}
</table>
{local_table}</body></html>
"""
    return web.Response(text=body, content_type="text/html")
