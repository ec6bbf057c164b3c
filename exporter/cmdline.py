"""What a ``dask worker`` command line says about the workers it starts.

Recognises the ways a nanny host is launched (``dask worker``, ``dask-worker``,
``python -m distributed.cli.dask_worker``, ``python -m dask worker``, dask-cuda's variants) and
parses the options with distributed's own click definition, keeping only those given
explicitly: an option taken from the environment or a default is invisible to another process
and must not constrain anything.

Pure: it takes a command line as a sequence of strings and reads no process table
(``process.py`` does) and no scheduler state; comparing a parsed command with the scheduler's
workers is ``matching.py``'s job.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from dask.utils import parse_bytes

__all__ = ["WorkerCommand", "parse_worker_command"]

logger = logging.getLogger(__name__)

_WORKER_SCRIPTS = ("dask-worker", "dask-cuda-worker")
_WORKER_MODULES = ("distributed.cli.dask_worker", "dask_cuda.cli.dask_cuda_worker")


@dataclass(frozen=True, slots=True)
class WorkerCommand:
    """The options of one ``dask worker`` command line that bear on its workers' identity.

    Only options given on the command line are set; the rest stay None (unknown), never a
    default, so that ``matching`` treats them as no constraint.
    """

    scheduler: str | None = None
    name: str | None = None
    nworkers: int = 1
    nanny: bool = True
    nthreads: int | None = None
    memory_limit: int | None = None
    """Bytes per worker; None for ``auto`` or a fraction of the host's memory."""
    worker_ports: frozenset[int] | None = None
    nanny_ports: frozenset[int] | None = None
    host: str | None = None

    def names(self) -> frozenset[str] | None:
        """Worker names this command gives (``NAME`` or ``NAME-0 .. NAME-<n-1>``)."""
        if not self.name:
            return None
        if self.nworkers == 1:
            return frozenset({self.name})
        return frozenset(f"{self.name}-{i}" for i in range(self.nworkers))


def parse_worker_command(cmdline: Iterable[str]) -> WorkerCommand | None:
    """Parse a ``dask worker`` command line; None if it is not one.

    Uses distributed's own click definition (``resilient_parsing``: no callbacks, no errors),
    keeping only the options given explicitly. An unparsable command line is still a worker
    host, just one without constraints.
    """
    argv = tuple(cmdline)
    start = _options_start(argv)
    if start is None:
        return None
    if "cuda" in " ".join(argv[:start]):
        return WorkerCommand()  # dask-cuda: other options; one worker per GPU
    try:
        params = _click_params(list(argv[start:]))
    except Exception as e:  # an option this distributed does not know: no constraints
        logger.debug("cannot parse worker command line %s: %s", argv, e)
        return WorkerCommand()
    return _command_from_params(params)


def _options_start(argv: tuple[str, ...]) -> int | None:
    """Index of the first option after the ``dask worker`` invocation; None if there is none.

    Only the first four words are looked at: the interpreter, possibly ``-m``, the script or
    module, and ``worker``; a later ``dask`` is an argument, not the program.
    """
    for i, arg in enumerate(argv[:4]):
        base = os.path.basename(arg)
        if base in _WORKER_SCRIPTS:
            return i + 1
        if base == "dask" and argv[i + 1 : i + 2] == ("worker",):
            return i + 2
        if arg == "-m" and i + 1 < len(argv):
            if argv[i + 1] in _WORKER_MODULES:
                return i + 2
            if argv[i + 1 : i + 3] == ("dask", "worker"):
                return i + 3
    return None


def _click_params(args: list[str]) -> dict[str, Any]:
    from click.core import ParameterSource
    from distributed.cli.dask_worker import main

    known = {o for param in main.params for o in (*param.opts, *param.secondary_opts)}
    unknown = [a for a in args if a.startswith("-") and a.split("=", 1)[0] not in known]
    if unknown:  # resilient parsing would shift values around: constrain nothing
        raise ValueError(f"unknown options {unknown}")
    # resilient_parsing: no callbacks (--preload's would import the user's modules here).
    ctx = main.make_context("dask worker", args, resilient_parsing=True)
    return {
        k: v
        for k, v in ctx.params.items()
        if ctx.get_parameter_source(k) == ParameterSource.COMMANDLINE
    }


def _ports(value: Any) -> frozenset[int] | None:
    """``9000``, ``9000:9010`` or a comma-separated list of those; None for 0 (any port)."""
    if not value:
        return None
    out: set[int] = set()
    for part in str(value).split(","):
        lo, _, hi = part.partition(":")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            return None
        out.update(range(int(lo), int(hi or lo) + 1))
    return frozenset(out) if 0 not in out else None


def _memory_limit(value: Any) -> int | None:
    """Bytes, or None where the limit depends on the host (``auto``, a fraction, 0)."""
    if value in (None, "auto"):
        return None
    try:
        number = float(value)
    except ValueError:
        try:
            return int(parse_bytes(str(value))) or None
        except (ValueError, TypeError):
            return None
    return int(number) if number > 1 else None


def _command_from_params(p: Mapping[str, Any]) -> WorkerCommand:
    nworkers = str(p.get("n_workers"))
    nthreads = p.get("nthreads")
    return WorkerCommand(
        scheduler=p.get("scheduler") or None,
        name=str(p["name"]) if p.get("name") not in (None, "") else None,
        nworkers=max(1, int(nworkers)) if nworkers.isdigit() else 1,
        nanny=bool(p.get("nanny", True)),
        nthreads=nthreads if isinstance(nthreads, int) and nthreads > 0 else None,
        memory_limit=_memory_limit(p.get("memory_limit")),
        worker_ports=_ports(p.get("worker_port")),
        nanny_ports=_ports(p.get("nanny_port")),
        host=str(p["host"]) if p.get("host") else None,
    )
