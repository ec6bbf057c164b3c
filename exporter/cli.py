"""Command line: ``serve``, ``demo``, ``generate {rules,dashboards}`` and ``diagnose``.

Bad input (an unparsable address, an invalid option) is reported as one line on stderr with
exit status 2; an unexpected failure is logged as one line with exit status 1. Neither prints
a traceback unless ``--log-level DEBUG`` is given.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib
import logging
import signal
import sys
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from .config import LOG_LEVELS, ConfigError, Settings, add_settings_options, load_settings
from .mixin import MixinConfig

__all__ = ["main"]

logger = logging.getLogger("dask_memory_exporter")
PROG = "dask-memory-exporter"


class UsageError(Exception):
    """Bad command-line input: one line, exit 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


@dataclasses.dataclass(frozen=True)
class Option:
    """One option of ``demo`` or ``generate``; ``--help`` shows its default."""

    name: str
    help: str
    default: Any = None
    type: Callable[[str], Any] | None = None
    choices: Sequence[str] | None = None
    metavar: str | None = None
    action: str | None = None

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        shown = "" if self.default is None else f" (default: {self.default})"
        extra: dict[str, Any] = {
            k: v for k, v in (("type", self.type), ("action", self.action)) if v
        }
        parser.add_argument(
            f"--{self.name}",
            default=self.default,
            choices=self.choices,
            metavar=self.metavar,
            help=self.help + shown,
            **extra,
        )


DEMO_OPTIONS = (
    Option("listen", "exporter listen address HOST:PORT", "127.0.0.1:9787"),
    Option(
        "scenario",
        "which workload to run: all three workers, or one of them",
        "all",
        choices=("all", "leak", "spill", "idle"),
    ),
    Option("memory-limit", "memory limit per worker", "400MiB"),
    Option("leak-rate", "bytes the leak worker leaks per second", "4MiB"),
    Option("duration", "stop after this many seconds (default: run until Ctrl-C)", type=float),
    Option("log-level", "logging level", "INFO", type=str.upper, choices=LOG_LEVELS),
)


@dataclasses.dataclass(frozen=True)
class Generator:
    """What ``generate <what>`` writes and where it writes it by default."""

    help: str
    module: str
    function: str
    default_dir: Path


GENERATORS = {
    "rules": Generator(
        "alert and recording rules", "rules", "render_files", Path("deploy/prometheus")
    ),
    "dashboards": Generator(
        "Grafana dashboards", "dashboards", "render_files", Path("grafana/dashboards")
    ),
    "provisioning": Generator(
        "Grafana provisioning files",
        "dashboards",
        "render_provisioning",
        Path("grafana/provisioning"),
    ),
}


GENERATE_OPTIONS = (
    Option(
        "output-dir",
        "directory to write the files into (default: "
        + ", ".join(f"{g.default_dir} for {name}" for name, g in GENERATORS.items())
        + ")",
        type=Path,
    ),
    Option(
        "set",
        "override a mixin setting, repeatable; KEY is one of "
        + ", ".join(f.name for f in dataclasses.fields(MixinConfig)),
        metavar="KEY=VALUE",
        action="append",
    ),
)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Prometheus exporter for Dask worker memory.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    serve = sub.add_parser(
        "serve",
        help="poll a scheduler and serve /metrics",
        description="Poll a Dask scheduler and serve /metrics. Every option has an environment "
        "twin; the command line wins over the environment, which wins over Dask's config.",
    )
    serve.set_defaults(settings_source=add_settings_options(serve))

    demo = sub.add_parser("demo", help="embedded demo: a LocalCluster with a scripted workload")
    for option in DEMO_OPTIONS:
        option.add_to(demo)

    gen = sub.add_parser(
        "generate",
        help="write alert rules, dashboards or Grafana provisioning files from the mixin config",
    )
    gen.add_argument(
        "what",
        choices=list(GENERATORS),
        help="; ".join(f"{name}: {g.help}" for name, g in GENERATORS.items()),
    )
    for option in GENERATE_OPTIONS:
        option.add_to(gen)
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
    config = mixin_config(args.set or ())
    generator = GENERATORS[args.what]
    module = importlib.import_module(f".{generator.module}", __package__)
    render: Callable[[MixinConfig], dict[str, str]] = getattr(module, generator.function)
    out: Path = args.output_dir or generator.default_dir
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
    """Settings from ``serve``'s parsed options (pydantic-settings' CLI source), then env."""
    return load_settings({}, cli=args.settings_source(parsed_args=args))


async def _serve(settings: Settings) -> None:
    from .server import serve

    await serve(settings, wait_for_signal)


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
    debug = False
    try:
        parser = build_parser()  # shows defaults from Dask's config, which may be invalid
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
