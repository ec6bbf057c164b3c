"""The exporter inside the scheduler's process: a Dask scheduler preload.

::

    dask scheduler --preload dask_memory_exporter.preload --memory-exporter-port 9787
    LocalCluster(scheduler_kwargs={"preload": ["dask_memory_exporter.preload"],
                                   "preload_argv": ["--memory-exporter-port", "9787"]})
    SLURMCluster(..., scheduler_options={"preload": [...], "preload_argv": [...]})

On HPC (dask-jobqueue) the scheduler lives inside the user's Python process on a login node:
there is no pod to add a sidecar to. The preload serves the same ``/metrics``, ``/``,
``/healthz`` and ``/readyz`` from the scheduler's own event loop, with the roster read from
``Scheduler.workers`` by ``SchedulerStateSource`` (exact ``WorkerState.memory``, no RPC).
Rendering happens in a thread; the event loop only copies the workers' state once per
heartbeat interval and hands cached bytes to scrapes (measured in benchmarks/preload_cost.py).

Failures never take the scheduler down, because the scheduler is the user's computation and
the exporter only watches it. A port already in use, an invalid option given through
``preload_argv`` or an invalid ``DASK_MEMORY_EXPORTER_*`` variable is logged as one ERROR
line and the scheduler runs on without the exporter. On the ``dask scheduler`` command line,
Dask checks the preload's options before the scheduler starts: an invalid one is one line on
stderr and exit status 2.

With ``--memory-exporter-file-sd PATH`` the preload writes a Prometheus ``file_sd_configs``
file naming its own address, and deletes it when the scheduler closes (docs/hpc.md).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import weakref
from pathlib import Path
from typing import Any

import click
from distributed import Scheduler
from distributed.comm.addressing import get_address_host

from .config import ConfigError, load_settings
from .scheduler_state import SchedulerStateSource
from .server import ExporterServer, ListenError

__all__ = ["PreloadExporter", "dask_setup", "dask_teardown", "running", "scrape_target"]

logger = logging.getLogger("dask_memory_exporter")
PREFIX = "dask-memory-exporter preload"
DEFAULT_PORT = 9787
_WILDCARDS = ("", "0.0.0.0", "::")


class PreloadExporter:
    """One exporter serving from one scheduler's process, and its file_sd file."""

    def __init__(
        self,
        scheduler: Any,
        server: ExporterServer,
        file_sd: Path | None,
        cluster: str | None,
    ) -> None:
        self.scheduler = scheduler
        self.server = server
        self.file_sd = file_sd
        self.cluster = cluster

    @property
    def target(self) -> str:
        """``host:port`` Prometheus should scrape (see :func:`scrape_target`)."""
        return scrape_target(
            self.server.settings.listen_host, self.server.port, str(self.scheduler.address)
        )

    @property
    def url(self) -> str:
        return f"{self.server.scheme}://{self.target}"

    def file_sd_entries(self) -> list[dict[str, Any]]:
        """The file_sd document: one target group, with ``cluster`` if one was named."""
        group: dict[str, Any] = {"targets": [self.target]}
        if self.cluster:
            group["labels"] = {"cluster": self.cluster}
        return [group]

    def write_file_sd(self) -> None:
        """Write the file_sd file atomically: Prometheus never reads half a file."""
        if self.file_sd is None:
            return
        path = self.file_sd
        text = json.dumps(self.file_sd_entries(), indent=2) + "\n"
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def remove_file_sd(self) -> None:
        if self.file_sd is not None:
            with contextlib.suppress(FileNotFoundError):
                self.file_sd.unlink()

    async def stop(self) -> None:
        self.remove_file_sd()
        await self.server.stop()


_RUNNING: weakref.WeakKeyDictionary[Any, PreloadExporter] = weakref.WeakKeyDictionary()


def running(scheduler: Any) -> PreloadExporter | None:
    """The exporter the preload runs in this scheduler, if it started."""
    return _RUNNING.get(scheduler)


def scrape_target(listen_host: str, port: int, scheduler_address: str) -> str:
    """``host:port`` for Prometheus: the listen host, or for a wildcard listener the host the
    scheduler is contacted at (on HPC, the login node's address the workers use)."""
    host = listen_host
    if host in _WILDCARDS:
        try:
            host = get_address_host(scheduler_address)
        except (ValueError, TypeError):  # e.g. inproc://: no network host at all
            host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"{host}:{port}"


class PreloadArgumentError(click.ClickException):
    """An invalid preload option: click prints ``Error: <message>``, one line, exit 2."""

    exit_code = 2


class _SetupCommand(click.Command):
    """``dask_setup`` as a click command whose argument errors are one line, never a
    traceback.

    Dask parses a preload's options twice: ``dask scheduler`` checks them before it starts
    (``parse_args``: we raise a one-line ClickException, printed as ``Error: ...``, exit 2),
    and the preload manager parses them when the scheduler has started (``make_context``:
    an exception there would be logged with a traceback, so the error is handed to the
    callback, which logs one line).
    """

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as e:
            raise PreloadArgumentError(f"{PREFIX}: {_one_line(e)}") from None

    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: click.Context | None = None,
        **extra: Any,
    ) -> click.Context:
        try:
            return super().make_context(info_name, args, parent, **extra)
        except click.ClickException as e:
            ctx = click.Context(self, info_name=info_name, parent=parent)
            ctx.params = {"argv_error": e.format_message()}
            return ctx


def _one_line(e: click.UsageError) -> str:
    return " ".join(e.format_message().split())


@click.command(cls=_SetupCommand)
@click.option(
    "--memory-exporter-port",
    type=click.IntRange(0, 65535),
    default=DEFAULT_PORT,
    show_default=True,
    help="HTTP port of the exporter's /metrics (0: any free port)",
)
@click.option(
    "--memory-exporter-host",
    default="0.0.0.0",
    show_default=True,
    help="address to listen on",
)
@click.option(
    "--memory-exporter-file-sd",
    type=click.Path(dir_okay=False, writable=True),
    default=None,
    help="write a Prometheus file_sd file naming this exporter; deleted when the scheduler closes",
)
@click.option(
    "--memory-exporter-cluster",
    default=None,
    help="a 'cluster' label for the file_sd target",
)
@click.option(
    "--memory-exporter-web-config-file",
    type=click.Path(dir_okay=False),
    default=None,
    help="exporter-toolkit web configuration file (TLS, basic auth)",
)
def dask_setup(
    scheduler: Any,
    argv_error: str | None = None,
    memory_exporter_port: int = DEFAULT_PORT,
    memory_exporter_host: str = "0.0.0.0",
    memory_exporter_file_sd: str | None = None,
    memory_exporter_cluster: str | None = None,
    memory_exporter_web_config_file: str | None = None,
) -> Any:
    """Start the exporter in the scheduler's process (Dask calls this once it listens)."""
    _route_logs()
    if argv_error is not None:
        logger.error("%s: %s; the scheduler runs without it", PREFIX, argv_error)
        return None
    return _start(
        scheduler,
        port=memory_exporter_port,
        host=memory_exporter_host,
        file_sd=memory_exporter_file_sd,
        cluster=memory_exporter_cluster,
        web_config_file=memory_exporter_web_config_file,
    )


def _route_logs() -> None:
    """Log where the scheduler logs: ``dask scheduler`` configures only the ``distributed``
    logger, so without a handler of its own (or the root's) the exporter borrows its
    handlers and level, and its lines appear in the scheduler's log in the same format."""
    if logger.hasHandlers():
        return
    distributed = logging.getLogger("distributed")
    for handler in distributed.handlers:
        logger.addHandler(handler)
    logger.setLevel(distributed.getEffectiveLevel())
    logger.propagate = False


async def _start(
    scheduler: Any,
    *,
    port: int,
    host: str,
    file_sd: str | None,
    cluster: str | None,
    web_config_file: str | None,
) -> None:
    if not isinstance(scheduler, Scheduler):
        logger.error(
            "%s: %s is not a scheduler; preload it with `dask scheduler --preload`",
            PREFIX,
            type(scheduler).__name__,
        )
        return
    if running(scheduler) is not None:
        logger.error("%s: already running in this scheduler", PREFIX)
        return
    listen = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        settings = load_settings(
            {
                "scheduler": str(scheduler.address),
                "listen": listen,
                "mode": "scheduler",
                "web_config_file": web_config_file,
            }
        )
        server = ExporterServer(
            settings,
            [SchedulerStateSource(scheduler)],
            what=f"inside scheduler {scheduler.address}",
            standalone=False,
        )
        await server.start()
    except ListenError as e:
        logger.error(
            "%s: --memory-exporter-port %s on %s: %s; the scheduler runs without it",
            PREFIX,
            port,
            host,
            e.reason,
        )
        return
    except ConfigError as e:  # DASK_MEMORY_EXPORTER_* or the web configuration file
        logger.error("%s: %s; the scheduler runs without it", PREFIX, e)
        return
    exporter = PreloadExporter(
        scheduler, server, Path(file_sd).absolute() if file_sd else None, cluster
    )
    try:
        exporter.write_file_sd()
    except OSError as e:
        logger.error("%s: cannot write the file_sd file %s: %s", PREFIX, file_sd, e.strerror)
        exporter.file_sd = None
    _RUNNING[scheduler] = exporter
    logger.info("%s: /metrics at %s/metrics", PREFIX, exporter.url)


async def dask_teardown(scheduler: Any) -> None:
    """Stop serving and delete the file_sd file (Dask calls this when the scheduler closes)."""
    exporter = _RUNNING.pop(scheduler, None)
    if exporter is not None:
        await exporter.stop()
        logger.info("%s: stopped", PREFIX)
