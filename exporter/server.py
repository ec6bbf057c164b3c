"""HTTP server start-up and its limits: the one place that decides what a client may cost us.

A client that reaches the port must not be able to take the exporter down. Here, and only
here, the listening socket is opened with these limits:

* the soft ``RLIMIT_NOFILE`` is raised to the hard limit at start;
* at most ``http_max_connections`` connections are open at once (capped to the file limit
  minus a reserve for the scheduler comm, procfs, log files and one accept burst). At the
  cap, the oldest connection that is not in the middle of a request is closed to make room,
  so a flood of idle connections cannot lock out the next scrape; if every connection is
  busy, the new one gets a 503 and is closed. Under TLS the cap counts connections once
  their handshake is done; a socket that never completes one is closed after the idle
  timeout (asyncio's handshake timeout);
* a connection that has not sent a complete request ``http_idle_timeout`` seconds after it
  opened (or after its previous response) is closed: aiohttp's keep-alive timer, which runs
  from the start of a connection and is not reset by a trickle of header bytes;
* request lines and header fields are capped by aiohttp (8 KiB each, 128 fields): a bigger
  one is answered with 400;
* repeated errors from aiohttp and asyncio (bad requests, ``accept()`` out of file
  descriptors) are logged as one line per kind per interval, with the count suppressed, and
  never with a traceback when a client caused them.

What it does not cover: the web configuration file (TLS, basic auth), see ``webconfig.py``,
and the handlers, see ``app.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import resource
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from .config import ConfigError, Settings
from .source import Source
from .webconfig import CHECK_INTERVAL, WEB_CONFIG, WebConfigWatcher, load_web_config

__all__ = [
    "ConnectionGuard",
    "ExporterServer",
    "ListenError",
    "RateLimitFilter",
    "connection_cap",
    "install_log_limits",
    "raise_nofile_limit",
    "serve",
]

logger = logging.getLogger("dask_memory_exporter")
http_logger = logging.getLogger("dask_memory_exporter.http")  # rate-limited, see RateLimitFilter

# File descriptors kept free for everything that is not an HTTP connection: the scheduler
# comm, /proc reads in local mode, log files, the event loop's own pipes.
FD_RESERVE = 64
# asyncio accepts up to ``backlog`` sockets in one go before any evicted connection's socket
# is closed (that happens on the next loop iteration), so the cap leaves room for one burst.
BACKLOG = 128
LOG_INTERVAL = 60.0  # seconds: one line per kind of repeated error per interval
_BUSY_RESPONSE = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\n"
    b"Content-Length: 22\r\nConnection: close\r\n\r\ntoo many connections.\n"
)


class ListenError(ConfigError):
    """The listen address cannot be bound (in use, not local, not permitted): exit 2."""

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason or message
        """Why, without the option's name (the preload names its own options)."""


def raise_nofile_limit() -> int:
    """Raise the soft open-file limit to the hard one; return the soft limit now in force.

    The common default soft limit (1,024) is what lets a thousand idle connections starve
    the process; the hard limit is what the administrator allows.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            return hard
    return soft


def connection_cap(configured: int, nofile: int) -> int:
    """The connection limit in force: the configured one, within the file limit's reach.

    One accept burst (``BACKLOG``) and ``FD_RESERVE`` must fit beside the connections, or
    ``accept()`` and the process table fail with EMFILE under a flood.
    """
    if nofile == resource.RLIM_INFINITY or nofile <= 0:
        return configured
    return max(1, min(configured, nofile - FD_RESERVE - BACKLOG))


class RateLimitFilter(logging.Filter):
    """One line per kind of record per interval, then a count of what was suppressed.

    The kind is the logger, the message template and the exception type. Errors a client
    causes (an unparsable request, ``accept()`` out of descriptors) lose their traceback and
    become warnings: they are the client's doing, not a bug of ours.
    """

    def __init__(self, interval: float = LOG_INTERVAL, clock: Callable[[], float] = time.monotonic):
        super().__init__()
        self.interval = interval
        self.clock = clock
        self._last: dict[tuple[str, str, str], float] = {}
        self._suppressed: dict[tuple[str, str, str], int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        key = (record.name, str(record.msg), type(exc).__name__ if exc else "")
        now = self.clock()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return False
        self._last[key] = now
        if _client_caused(exc):
            record.msg = f"{record.getMessage()}: {type(exc).__name__}: {_short(exc)}"
            record.args = ()
            record.exc_info = None
            record.exc_text = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        suppressed = self._suppressed.pop(key, 0)
        if suppressed:
            record.msg = f"{record.getMessage()} ({suppressed} similar suppressed)"
            record.args = ()
        return True


def _client_caused(exc: BaseException | None) -> bool:
    if isinstance(exc, HttpProcessingError):
        return True
    return isinstance(exc, OSError) and exc.errno in (
        errno.EMFILE,
        errno.ENFILE,
        errno.ENOBUFS,
        errno.ENOMEM,
        errno.ECONNRESET,
        errno.ECONNABORTED,
    )


def _short(exc: BaseException | None) -> str:
    text = str(getattr(exc, "message", None) or exc).replace("\n", " ")
    return text if len(text) <= 200 else text[:200] + "..."


_FILTER = RateLimitFilter()


def install_log_limits(*, asyncio_too: bool = True) -> None:
    """Rate-limit the loggers a client can make talk: aiohttp's server and asyncio's."""
    names = ("aiohttp.server", "aiohttp.web", http_logger.name)
    for name in (*names, "asyncio") if asyncio_too else names:
        log = logging.getLogger(name)
        if _FILTER not in log.filters:
            log.addFilter(_FILTER)


class _Refuse(asyncio.Protocol):
    """Answer 503 and close: every allowed connection is busy with a request."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        with contextlib.suppress(Exception):
            transport.write(_BUSY_RESPONSE)
        transport.close()


class ConnectionGuard:
    """Protocol factory around aiohttp's Server that bounds the connections open at once.

    Called by the event loop once per accepted socket. At the cap it closes the oldest
    connection that is not handling a request (an idle or half-sent one), so that a new
    scrape always gets in; aiohttp keeps connections in the order they were opened.
    Handlers made but not yet connected (the event loop connects them a moment later, or
    after the TLS handshake) count too, for at most ``pending_timeout`` seconds.
    """

    def __init__(self, server: web.Server, limit: int, pending_timeout: float = 10.0) -> None:
        self.server = server
        self.limit = limit
        self.pending_timeout = pending_timeout
        self.evicted = 0
        self.refused = 0
        self._pending: dict[Any, float] = {}  # handler -> time made, until it is connected

    def __call__(self) -> asyncio.BaseProtocol:
        # A closed handler stays in server.connections until its task ends: skip it.
        open_ = [h for h in self.server.connections if h.transport is not None]
        now = time.monotonic()
        self._pending = {
            h: t
            for h, t in self._pending.items()
            if h.transport is None and now - t < self.pending_timeout
        }
        if len(open_) + len(self._pending) >= self.limit and not self._evict(open_):
            busy = sum(1 for h in open_ if _busy(h))
            if busy >= self.limit:
                self.refused += 1
                http_logger.warning(
                    "connection limit %d reached and every connection is busy: refusing",
                    self.limit,
                )
                return _Refuse()
            # Only handlers still being connected fill the cap: one accept burst, which
            # the file reserve covers (BACKLOG); let this one in.
        handler = self.server()
        self._pending[handler] = now
        return handler

    def _evict(self, open_: list[Any]) -> bool:
        for handler in open_:
            if not _busy(handler):
                handler.force_close()
                self.evicted += 1
                http_logger.warning(
                    "connection limit %d reached: closed the oldest idle connection", self.limit
                )
                return True
        return False


def _busy(handler: Any) -> bool:
    """Whether aiohttp is running a request handler on this connection."""
    return bool(getattr(handler, "_request_in_progress", False))  # no public accessor


class GuardedSite(web.TCPSite):
    """A TCPSite whose connections go through a ConnectionGuard."""

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        *,
        limit: int,
        ssl_context: ssl.SSLContext | None = None,
        handshake_timeout: float = 10.0,
    ) -> None:
        super().__init__(runner, host, port, ssl_context=ssl_context, backlog=BACKLOG)
        self.limit = limit
        self.handshake_timeout = handshake_timeout
        self.guard: ConnectionGuard | None = None

    @property
    def host(self) -> str:
        return str(self._host)

    async def start(self) -> None:
        self._runner._reg_site(self)  # what BaseSite.start does; TCPSite.start is replaced
        server = self._runner.server
        assert server is not None
        self.guard = ConnectionGuard(server, self.limit, self.handshake_timeout)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self.guard,
            self._host,
            self._port,
            ssl=self._ssl_context,
            backlog=self._backlog,
            ssl_handshake_timeout=self.handshake_timeout if self._ssl_context else None,
        )
        sockets = self._server.sockets
        self._bound_port = sockets[0].getsockname()[1] if sockets else self._port


class ExporterServer:
    """The exporter app behind a listener with the limits above: started, then stopped.

    ``serve`` runs one for the command line; the scheduler preload runs one inside the
    scheduler's process with its own sources, and ``standalone=False``: the process is not
    ours, so asyncio's logger (the scheduler's as well) is left without the rate limit and
    running as root is the scheduler's affair, not warned about.
    """

    def __init__(
        self,
        settings: Settings,
        sources: Sequence[Source] | None = None,
        *,
        what: str | None = None,
        standalone: bool = True,
    ) -> None:
        self.settings = settings
        self.sources = sources
        self.what = what or f"scheduler {settings.scheduler}, mode {settings.mode}"
        self.standalone = standalone
        self.app: web.Application | None = None
        self.site: GuardedSite | None = None
        self._runner: web.AppRunner | None = None
        self._reloader: asyncio.Task[None] | None = None

    @property
    def port(self) -> int:
        """The port listened on (the one the system chose for port 0)."""
        assert self.site is not None, "not started"
        return self.site.port

    @property
    def scheme(self) -> str:
        return "https" if self.site is not None and self.site._ssl_context else "http"

    async def start(self) -> None:
        """Listen and start polling; raise ListenError (one line) if the port cannot be had.

        With a web configuration file: TLS and basic auth from it, checked for changes every
        second; a change of the TLS part reopens the listener with the new context.
        """
        from .app import make_app

        settings = self.settings
        watcher = None
        if settings.web_config_file:
            watcher = WebConfigWatcher(load_web_config(settings.web_config_file))
        ssl_context = watcher.current.tls if watcher else None
        install_log_limits(asyncio_too=self.standalone)
        nofile = raise_nofile_limit()
        limit = connection_cap(settings.http_max_connections, nofile)
        self.app = app = make_app(settings, self.sources)
        if watcher is not None:
            app[WEB_CONFIG] = watcher
        self._runner = runner = web.AppRunner(
            app,
            access_log=None,
            handle_signals=False,
            keepalive_timeout=settings.http_idle_timeout,
            shutdown_timeout=5.0,
        )
        await runner.setup()
        self.site = site = GuardedSite(
            runner,
            settings.listen_host,
            settings.listen_port,
            limit=limit,
            ssl_context=ssl_context,
            handshake_timeout=settings.http_idle_timeout,
        )
        try:
            await site.start()
        except OSError as e:
            await self.stop()
            reason = _listen_reason(e)
            raise ListenError(f"--listen {settings.listen}: {reason}", reason) from None
        logger.info(
            "dask-memory-exporter serving on %s://%s:%s/metrics (%s; "
            "at most %d connections, idle timeout %gs, open-file limit %d)",
            self.scheme,
            settings.listen_host,
            site.port,
            self.what,
            limit,
            settings.http_idle_timeout,
            nofile,
        )
        if self.standalone and os.geteuid() == 0:
            logger.warning("running as root is not needed; run as an unprivileged user")
        if watcher is not None:
            self._reloader = asyncio.create_task(_reload_web_config(watcher, site, runner))

    async def stop(self) -> None:
        """Stop listening and polling; idempotent."""
        reloader, self._reloader = self._reloader, None
        if reloader is not None:
            reloader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reloader
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()


async def serve(settings: Settings, until: Callable[[], Awaitable[None]]) -> None:
    """Serve the app with the limits above until ``until()`` returns."""
    server = ExporterServer(settings)
    await server.start()
    try:
        await until()
    finally:
        await server.stop()


async def _reload_web_config(
    watcher: WebConfigWatcher, site: GuardedSite, runner: web.AppRunner
) -> None:
    """Apply changes of the web configuration file; reopen the listener when TLS changed."""
    while True:
        await asyncio.sleep(CHECK_INTERVAL)
        old_signature = watcher.current.tls_signature
        new = watcher.check()
        if new is None or new.tls_signature == old_signature:
            continue
        replacement = GuardedSite(
            runner,
            site.host,
            site.port,
            limit=site.limit,
            ssl_context=new.tls,
            handshake_timeout=site.handshake_timeout,
        )
        await site.stop()
        try:
            await replacement.start()
        except OSError as e:
            logger.error("cannot reopen the listener with the new TLS configuration: %s", e)
            await site.start()
            continue
        site = replacement
        logger.info("listener reopened with the new TLS configuration")


def _listen_reason(e: OSError) -> str:
    reasons = {
        errno.EADDRINUSE: "the address is already in use (another process holds the port)",
        errno.EADDRNOTAVAIL: "the address is not one of this host's",
        errno.EACCES: "permission denied (ports below 1024 need privileges)",
    }
    return "cannot listen: " + reasons.get(e.errno or 0, e.strerror or str(e))
