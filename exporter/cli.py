"""Command line: ``serve``, ``demo``, ``generate {rules,dashboards}`` and ``diagnose``.

Bad input (an unparsable address, an invalid option) is reported as one line on stderr with
exit status 2; an unexpected failure is logged as one line with exit status 1. Neither prints
a traceback unless ``--log-level DEBUG`` is given.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import signal
import sys
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from aiohttp import web

from .config import ConfigError, Settings, load_settings
from .mixin import MixinConfig

__all__ = ["main"]

logger = logging.getLogger("dask_memory_exporter")
PROG = "dask-memory-exporter"


class UsageError(Exception):
    """Bad command-line input: one line, exit 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _serve_options(p: argparse.ArgumentParser) -> None:
    """Options of ``serve``; each also comes from DASK_MEMORY_EXPORTER_<NAME>."""
    add = p.add_argument
    add("--scheduler", help="scheduler address (default: $DASK_SCHEDULER_ADDRESS)")
    add("--listen", help="HTTP listen address HOST:PORT (default: 0.0.0.0:9787)")
    add("--mode", choices=["scheduler", "local", "both"], help="data sources (default: scheduler)")
    add("--poll-interval", help="minimum time between polls, e.g. 5s (default: heartbeat interval)")
    add("--timeout", help="time allowed for one poll (default: 10s)")
    add("--max-backoff", help="longest retry wait while the scheduler is down (default: 30s)")
    add("--recent-to-old-time", help="window of unmanaged recent memory (default: Dask's, 30s)")
    for t in ("target", "spill", "pause", "terminate"):
        add(f"--{t}", type=float, help=f"{t} threshold as a fraction (default: Dask's config)")
    add("--proc-root", help="procfs root for local mode (default: /proc)")
    add(
        "--no-process-metrics",
        dest="process_metrics",
        action="store_const",
        const=False,
        help="do not export the exporter's own process_* metrics",
    )
    add("--log-level", help="DEBUG, INFO, WARNING or ERROR (default: INFO)")
    add("--tls-ca-file", help="CA certificate for a tls:// scheduler")
    add("--tls-cert", help="client certificate for a tls:// scheduler")
    add("--tls-key", help="client key for a tls:// scheduler")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Prometheus exporter for Dask worker memory.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    serve = sub.add_parser("serve", help="poll a scheduler and serve /metrics")
    _serve_options(serve)

    demo = sub.add_parser("demo", help="embedded demo: a LocalCluster with a scripted workload")
    demo.add_argument("--listen", default="127.0.0.1:9787", help="exporter listen HOST:PORT")
    demo.add_argument(
        "--scenario",
        choices=["all", "leak", "spill", "idle"],
        default="all",
        help="which workload to run (default: all three workers)",
    )
    demo.add_argument("--memory-limit", default="400MiB", help="memory limit per worker")
    demo.add_argument("--leak-rate", default="4MiB", help="bytes leaked per second")
    demo.add_argument("--duration", type=float, help="stop after this many seconds")
    demo.add_argument("--log-level", default="INFO")

    gen = sub.add_parser(
        "generate",
        help="write alert rules, dashboards or Grafana provisioning files from the mixin config",
    )
    gen.add_argument("what", choices=["rules", "dashboards", "provisioning"])
    gen.add_argument("--output-dir", type=Path, help="directory to write the files into")
    gen.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a mixin setting ({', '.join(f.name for f in _mixin_fields())})",
    )
    diagnose = sub.add_parser(
        "diagnose",
        help="run the unmanaged-memory playbook (gc, malloc_trim) on workers and give verdicts",
    )
    from .diagnose import add_arguments as add_diagnose_arguments

    add_diagnose_arguments(diagnose)
    return parser


def _mixin_fields() -> list[dataclasses.Field[Any]]:
    return list(dataclasses.fields(MixinConfig))


def mixin_config(assignments: Sequence[str]) -> MixinConfig:
    """MixinConfig with ``KEY=VALUE`` overrides, each coerced to the field's type."""
    hints = typing.get_type_hints(MixinConfig)
    known = {f.name for f in _mixin_fields()}
    changes: dict[str, Any] = {}
    for item in assignments:
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in known:
            raise UsageError(f"--set {item!r}: expected KEY=VALUE with KEY one of the settings")
        changes[key] = _coerce(key, raw, hints[key])
    return dataclasses.replace(MixinConfig(), **changes)


def _coerce(key: str, raw: str, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    try:
        if hint is bool:
            if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(raw)
            return raw.lower() in ("true", "1", "yes")
        if hint in (int, float, str):
            return hint(raw)
        if origin is tuple:
            return tuple(x.strip() for x in raw.split(",") if x.strip())
        if origin in (typing.Union, types.UnionType):
            return raw
    except ValueError:
        raise UsageError(f"--set {key}: invalid value {raw!r}") from None
    return raw


def _generate(args: argparse.Namespace) -> int:
    config = mixin_config(args.set)
    render: Callable[[MixinConfig], dict[str, str]]
    if args.what == "rules":
        from .rules import render_files as render_rules

        render, default_dir = render_rules, Path("deploy/prometheus")
    elif args.what == "dashboards":
        from .dashboards import render_files as render_dashboards

        render, default_dir = render_dashboards, Path("grafana/dashboards")
    else:
        from .dashboards import render_provisioning

        render, default_dir = render_provisioning, Path("grafana/provisioning")
    out: Path = args.output_dir or default_dir
    try:
        files = render(config)
    except ValueError as e:  # a setting the generator rejects, e.g. a bad duration
        raise UsageError(f"--set: {e}") from None
    out.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (out / name).write_text(text)
        print(out / name)
    return 0


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if level.upper() != "DEBUG":
        # distributed logs every refused connection at length; the Poller reports them.
        logging.getLogger("distributed").setLevel(logging.ERROR)


def _settings_from(args: argparse.Namespace) -> Settings:
    fields = Settings.model_fields
    overrides = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    return load_settings(overrides)


async def _serve(settings: Settings) -> None:
    from .app import make_app

    app = make_app(settings)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, settings.listen_host, settings.listen_port)
    try:
        await site.start()
        logger.info(
            "dask-memory-exporter serving on http://%s:%s/metrics (scheduler %s, mode %s)",
            settings.listen_host,
            settings.listen_port,
            settings.scheduler,
            settings.mode,
        )
        if os.geteuid() == 0:
            logger.warning("running as root is not needed; run as an unprivileged user")
        await wait_for_signal()
    finally:
        await runner.cleanup()


async def wait_for_signal() -> None:
    """Return on SIGINT or SIGTERM."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dask-memory-exporter`` command."""
    parser = build_parser()
    debug = False
    try:
        args = parser.parse_args(argv)
        if args.version:
            from . import __version__

            print(f"{PROG} {__version__}")
            return 0
        if args.command is None:
            parser.print_help()
            return 2
        if args.command == "generate":
            return _generate(args)
        if args.command == "diagnose":
            from .diagnose import run_diagnose

            return run_diagnose(args, PROG)
        if args.command == "demo":
            from .demo import run_demo

            _setup_logging(args.log_level)
            return run_demo(args)
        settings = _settings_from(args)
        debug = settings.log_level == "DEBUG"
        _setup_logging(settings.log_level)
        asyncio.run(_serve(settings))
        return 0
    except (UsageError, ConfigError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except OSError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except Exception as e:
        if debug:
            logger.exception("fatal error")
        else:
            print(f"{PROG}: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
