"""LocalProcessSource: RSS of the Dask worker processes beside the exporter, read from the OS.

Sidecar mode (``--mode local`` or ``both``). The exporter runs on the workers' host, or in
their Kubernetes pod with ``shareProcessNamespace: true``, finds the Dask worker processes in
the process table and reads their RSS with psutil's ``memory_info()`` (``/proc/<pid>/statm``:
one small read, never ``smaps``, which is slow on big processes and needs ptrace rights).
The figure comes from the kernel, so it stays live while a task holding the GIL freezes the
worker's event loop, its heartbeats and its own ``/metrics``.

What counts as a worker process:

- the children of a ``dask worker`` / ``dask-worker`` / ``python -m distributed.cli.dask_worker``
  process (the nanny host), minus multiprocessing's helpers (resource tracker, forkserver;
  the forkserver's own children count). These are the processes whose RSS Dask's memory
  manager and the nanny judge;
- a ``dask worker --no-nanny`` process itself;
- any other process (a LocalCluster's spawned children, a custom launcher) only when it is
  seen listening on a worker address the scheduler reports: that needs the worker's UID.

Matching a process to its scheduler entry (``match``), strongest first:

1. sticky: a (pid, start time) matched before keeps its address while the scheduler lists it
   (an address never moves to another process; a nanny restart brings a new pid *and* a new
   address, which is matched afresh);
2. listening port: the process listens on the worker's address (same UID, or root);
3. command line and process tree (any UID): the nanny host's ``dask worker`` options
   (``--name``, ``--nthreads``, ``--memory-limit``, ``--worker-port``, ``--nanny-port``,
   ``--no-dashboard`` ..., parsed with distributed's own CLI definition) and, when its
   sockets are readable, the nanny's listening port narrow the scheduler's local workers down;
   a nanny with one unmatched child and exactly one remaining candidate is a match. Repeated
   until nothing changes, so each match can settle another by elimination.

A process left unmatched (the scheduler does not know it yet, is down, or several children of
one nanny cannot be told apart without their sockets) is still reported, with its RSS only.
This module does not decide what is exported (``snapshot.Poller``) and reads no settings.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import psutil
from dask.utils import parse_bytes

from .names import EXPORTER_LOCAL_UNREADABLE_PROCESSES, SOURCE_LOCAL, Metric
from .source import LocalOnlyProcess, SourceError, SourceResult, WorkerInfo

__all__ = [
    "LocalProcess",
    "LocalProcessSource",
    "LocalReading",
    "ProcKey",
    "WorkerCommand",
    "match",
    "parse_worker_command",
]

logger = logging.getLogger(__name__)

ProcKey = tuple[int, float]
"""(pid, start time): a pid alone can be reused by another process."""
Listening = frozenset[tuple[str, int]]
"""Listening TCP sockets of a process as (ip, port)."""

# A command line cached earlier than this after the process started may still be its parent's
# (between fork and exec of a spawned child): read it again next time.
_CMDLINE_SETTLE_SECONDS = 2.0
_MP_HELPERS = ("multiprocessing.resource_tracker", "multiprocessing.semaphore_tracker")
_MP_FORKSERVER = "multiprocessing.forkserver"
REASON_UNREADABLE = "unreadable"
"""The source's one failure: the process table could not be read at all."""


# --- the `dask worker` command line --------------------------------------------------------
@dataclass(frozen=True, slots=True)
class WorkerCommand:
    """What a ``dask worker`` command line says about the workers it starts.

    Only options given on the command line constrain anything; those that come from the
    environment or a default are invisible to another process and stay None.
    """

    scheduler: str | None = None
    name: str | None = None
    nworkers: int = 1
    nanny: bool = True
    nthreads: int | None = None
    memory_limit: int | None = None
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

    def allows(self, w: WorkerInfo) -> bool:
        """Could ``w`` be one of the workers this command started?"""
        names = self.names()
        if names is not None and w.name not in names:
            return False
        if self.nthreads is not None and w.nthreads != self.nthreads:
            return False
        if (
            self.memory_limit is not None
            and self.nworkers == 1
            and (w.memory_limit or 0) != self.memory_limit
        ):
            return False
        if self.worker_ports is not None and _port(w.address) not in self.worker_ports:
            return False
        if self.nanny_ports is not None and (
            w.nanny is None or _port(w.nanny) not in self.nanny_ports
        ):
            return False
        if self.nanny and w.nanny is None:
            return False
        if not self.nanny and w.nanny is not None:
            return False
        return not (self.host is not None and _is_ip(self.host) and w.host != self.host)

    def same_scheduler(self, address: str | None) -> bool:
        """False only if this command clearly names another scheduler than ``address``."""
        if not self.scheduler or not address:
            return True
        mine, theirs = _host_port(self.scheduler), _host_port(address)
        if mine is None or theirs is None:
            return True
        if mine[1] != theirs[1]:
            return False
        return not (_is_ip(mine[0]) and _is_ip(theirs[0]) and mine[0] != theirs[0])


def _is_worker_cli(cmdline: tuple[str, ...]) -> int | None:
    """Index of the first option after the ``dask worker`` invocation, or None."""
    for i, arg in enumerate(cmdline[:4]):
        base = os.path.basename(arg)
        if base in ("dask-worker", "dask-cuda-worker"):
            return i + 1
        if base == "dask" and i + 1 < len(cmdline) and cmdline[i + 1] == "worker":
            return i + 2
        if arg == "-m" and i + 1 < len(cmdline):
            if cmdline[i + 1] in ("distributed.cli.dask_worker", "dask_cuda.cli.dask_cuda_worker"):
                return i + 2
            if cmdline[i + 1] == "dask" and i + 2 < len(cmdline) and cmdline[i + 2] == "worker":
                return i + 3
    return None


def parse_worker_command(cmdline: Iterable[str]) -> WorkerCommand | None:
    """Parse a ``dask worker`` command line; None if it is not one.

    Uses distributed's own click definition (``resilient_parsing``: no callbacks, no errors),
    keeping only the options given explicitly. An unparsable command line is still a worker
    host, just one without constraints.
    """
    argv = tuple(cmdline)
    start = _is_worker_cli(argv)
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


def _command_from_params(p: Mapping[str, Any]) -> WorkerCommand:
    def ports(v: Any) -> frozenset[int] | None:
        if not v:
            return None
        out: set[int] = set()
        for part in str(v).split(","):
            lo, _, hi = part.partition(":")
            if not lo.isdigit() or (hi and not hi.isdigit()):
                return None
            out.update(range(int(lo), int(hi or lo) + 1))
        return frozenset(out) if 0 not in out else None

    nworkers = str(p.get("n_workers"))
    n = int(nworkers) if nworkers.isdigit() else 1
    limit: int | None = None
    raw_limit = p.get("memory_limit")
    if raw_limit not in (None, "auto"):
        try:
            value = float(raw_limit)
            limit = int(value) if value > 1 else None  # a fraction: depends on the host
        except ValueError:
            try:
                limit = int(parse_bytes(str(raw_limit)))
            except (ValueError, TypeError):
                limit = None
    nthreads = p.get("nthreads")
    return WorkerCommand(
        scheduler=p.get("scheduler") or None,
        name=str(p["name"]) if p.get("name") not in (None, "") else None,
        nworkers=max(1, n),
        nanny=bool(p.get("nanny", True)),
        nthreads=int(nthreads) if isinstance(nthreads, int) and nthreads > 0 else None,
        memory_limit=limit if limit else None,
        worker_ports=ports(p.get("worker_port")),
        nanny_ports=ports(p.get("nanny_port")),
        host=str(p["host"]) if p.get("host") else None,
    )


def _host_port(address: str) -> tuple[str, int] | None:
    loc = address.split("://", 1)[-1]
    host, sep, port = loc.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def _port(address: str) -> int | None:
    hp = _host_port(address)
    return hp[1] if hp else None


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


# --- matching (pure) ---------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Candidate:
    """A process that may be a Dask worker, as the matcher sees it."""

    key: ProcKey
    host_pid: int | None
    """The ``dask worker`` process that started it (itself with ``--no-nanny``), if any."""
    command: WorkerCommand | None
    """That host's command line, parsed."""
    listening: Listening | None = None
    """The process's listening sockets; None where they cannot be read."""
    host_listening: Listening | None = None
    """The host's (the nanny's) listening sockets; None where they cannot be read."""


def _listens_on(listening: Listening, address: str | None) -> bool:
    if address is None:
        return False
    hp = _host_port(address)
    if hp is None:
        return False
    host, port = hp
    return any(p == port and ip in (host, "0.0.0.0", "::", "") for ip, p in listening)


def match(
    candidates: Iterable[Candidate],
    workers: Mapping[str, WorkerInfo],
    previous: Mapping[ProcKey, str],
    local_hosts: frozenset[str] | None,
) -> dict[ProcKey, tuple[str, str]]:
    """Tie local processes to scheduler workers: {process key: (address, how)}.

    ``local_hosts`` are the IP addresses of this network namespace (None: unknown); a worker
    whose host is another IP cannot be one of ours. See the module docstring for the order.
    """
    cands = list(candidates)
    out: dict[ProcKey, tuple[str, str]] = {}
    taken: set[str] = set()

    def assign(c: Candidate, addr: str, how: str) -> None:
        out[c.key] = (addr, how)
        taken.add(addr)

    for c in cands:  # 1. sticky
        addr = previous.get(c.key)
        if addr is not None and addr in workers and addr not in taken:
            assign(c, addr, "sticky")
    for c in cands:  # 2. listening port
        if c.key in out or not c.listening:
            continue
        hits = [a for a in workers if a not in taken and _listens_on(c.listening, a)]
        if len(hits) == 1:
            assign(c, hits[0], "port")

    def local(w: WorkerInfo) -> bool:
        if local_hosts is None or not _is_ip(w.host):
            return True
        return w.host in local_hosts

    groups: dict[int, list[Candidate]] = {}
    for c in cands:
        if c.host_pid is not None:
            groups.setdefault(c.host_pid, []).append(c)
    changed = True
    while changed:  # 3. command line and process tree, to a fixpoint
        changed = False
        for members in groups.values():
            free = [c for c in members if c.key not in out]
            if len(free) != 1:
                continue
            c = free[0]
            command = c.command or WorkerCommand()
            options = [
                a
                for a, w in workers.items()
                if a not in taken
                and local(w)
                and command.allows(w)
                # A worker last heard of before this process started belongs to a process
                # that is gone (the nanny restarted it under a new address).
                and w.last_seen >= c.key[1]
                and (
                    c.host_listening is None
                    or not command.nanny
                    or _listens_on(c.host_listening, w.nanny)
                )
            ]
            if len(options) == 1:
                assign(c, options[0], "cmdline")
                changed = True
    return out


# --- reading the process table -----------------------------------------------------------
@dataclass(frozen=True, slots=True)
class LocalProcess:
    """One Dask worker process beside the exporter, with the RSS read in this poll."""

    pid: int
    start_time: float
    rss: int | None
    """Bytes resident; None where reading it was denied (the heartbeat's figure is used)."""
    address: str | None = None
    """The scheduler address it was matched to; None if unmatched."""
    how: str = ""
    """How it was matched: sticky, port or cmdline."""
    name: str | None = None
    """A name from the nanny's command line (``--name``) when it names only this process."""

    @property
    def key(self) -> ProcKey:
        return (self.pid, self.start_time)


@dataclass(frozen=True, slots=True)
class LocalReading:
    """The result of one read of the local process table."""

    processes: tuple[LocalProcess, ...] = ()
    ok: bool = True
    """False when the process table could not be read at all (then no processes)."""
    denied: int = 0
    """Worker processes whose RSS could not be read (permission denied)."""

    @property
    def matched(self) -> dict[str, LocalProcess]:
        return {p.address: p for p in self.processes if p.address is not None}

    @property
    def unmatched(self) -> tuple[LocalProcess, ...]:
        return tuple(p for p in self.processes if p.address is None)


@dataclass(slots=True)
class _Proc:
    pid: int
    ppid: int
    start_time: float
    cmdline: tuple[str, ...]


@dataclass(slots=True)
class _Cache:
    cmdlines: dict[ProcKey, tuple[str, ...]] = field(default_factory=dict)
    listening: dict[ProcKey, tuple[float, Listening | None]] = field(default_factory=dict)


def _local_hosts() -> frozenset[str] | None:
    try:
        addrs = psutil.net_if_addrs()
    except OSError:
        return None
    return frozenset(
        a.address.split("%", 1)[0]
        for nics in addrs.values()
        for a in nics
        if a.family in (2, 10)  # AF_INET, AF_INET6
    )


class LocalProcessSource:
    """Finds the Dask worker processes beside the exporter and reads their RSS.

    ``read()`` does blocking /proc I/O: the Poller runs it in a thread, one call at a time.
    ``proc_root`` is procfs (``/proc``, or the host's procfs mounted elsewhere); psutil reads
    it through its process-wide ``PROCFS_PATH``, so the exporter sets it once here.
    """

    name = SOURCE_LOCAL
    roster = False
    families: tuple[Metric, ...] = ()
    reasons: tuple[str, ...] = (REASON_UNREADABLE,)

    def __init__(
        self,
        proc_root: str = "/proc",
        *,
        scheduler_address: str | None = None,
        local_hosts: Callable[[], frozenset[str] | None] = _local_hosts,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if proc_root != psutil.PROCFS_PATH:
            logger.info("reading processes from %s", proc_root)
            psutil.PROCFS_PATH = proc_root
        self.proc_root = proc_root
        self.scheduler_address = scheduler_address
        self.local_hosts = local_hosts
        self.clock = clock
        self.own_pid = os.getpid()
        self._cache = _Cache()
        self._previous: dict[ProcKey, str] = {}
        self._first_seen: dict[str, float] = {}
        self._warned_table = False
        self._warned_denied: set[ProcKey] = set()

    # Seams (overridden in tests): each is one psutil call on one process.
    def _rss(self, proc: psutil.Process) -> int:
        return int(proc.memory_info().rss)

    def _listening(self, proc: psutil.Process) -> Listening:
        conns = proc.net_connections(kind="tcp")
        return frozenset(
            (c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN and c.laddr
        )

    def read(self, workers: Mapping[str, WorkerInfo] | None = None) -> LocalReading:
        """Find the worker processes, match them to ``workers`` and read their RSS."""
        try:
            table = self._table()
        except OSError as e:
            if not self._warned_table:
                self._warned_table = True
                logger.warning(
                    "cannot read the process table at %s (%s): no direct RSS, the heartbeat's "
                    "figures are used instead",
                    self.proc_root,
                    e,
                )
            return LocalReading(ok=False)
        if self._warned_table:
            logger.info("process table at %s readable again", self.proc_root)
            self._warned_table = False
        cands, unverified, names = self._candidates(table)
        workers = workers or {}
        now = self.clock()
        for addr in workers:
            self._first_seen.setdefault(addr, now)
        for addr in self._first_seen.keys() - workers.keys():
            del self._first_seen[addr]

        matched = self._match(cands, unverified, table, workers, now)
        self._previous = {k: a for k, (a, _) in matched.items()}

        out: list[LocalProcess] = []
        denied = 0
        host_keys = {c.key for c in cands}
        for key in host_keys | matched.keys():
            pid, start = key
            rss: int | None
            try:
                rss = self._rss(psutil.Process(pid))
            except psutil.NoSuchProcess:
                continue  # gone since the scan: skipped, no traceback
            except psutil.AccessDenied:
                rss = None
                denied += 1
                if key not in self._warned_denied:
                    self._warned_denied.add(key)
                    logger.warning(
                        "permission denied reading the RSS of worker process %d; its "
                        "heartbeat's figures are used instead (see docs/sidecar.md)",
                        pid,
                    )
            if rss == 0:
                continue  # a zombie (exited, not yet reaped): as good as gone
            addr, how = matched.get(key, ("", ""))
            out.append(LocalProcess(pid, start, rss, addr or None, how, names.get(key)))
        self._warned_denied &= {c.key for c in cands} | set(unverified)
        out.sort(key=lambda p: p.pid)
        return LocalReading(tuple(out), ok=True, denied=denied)

    def _table(self) -> dict[int, _Proc]:
        """pid -> (ppid, start time, command line) of every visible process."""
        table: dict[int, _Proc] = {}
        seen: set[ProcKey] = set()
        now = time.time()
        for pid in psutil.pids():  # OSError here: the table itself is unreadable
            try:
                p = psutil.Process(pid)
                with p.oneshot():
                    ppid = p.ppid()
                    start = p.create_time()
                    key = (pid, start)
                    cmd = self._cache.cmdlines.get(key)
                    if cmd is None:
                        cmd = tuple(p.cmdline())
                        if now - start > _CMDLINE_SETTLE_SECONDS:
                            self._cache.cmdlines[key] = cmd
            except (psutil.NoSuchProcess, psutil.ZombieProcess):
                continue
            except psutil.AccessDenied:
                continue  # hidepid and the like: that process is invisible to us
            seen.add(key)
            table[pid] = _Proc(pid, ppid, start, cmd)
        for key in self._cache.cmdlines.keys() - seen:
            del self._cache.cmdlines[key]
        for key in self._cache.listening.keys() - seen:
            del self._cache.listening[key]
        return table

    def _candidates(
        self, table: Mapping[int, _Proc]
    ) -> tuple[list[Candidate], list[ProcKey], dict[ProcKey, str]]:
        """Worker processes under a ``dask worker`` host, other spawned children, and names."""
        children: dict[int, list[_Proc]] = {}
        for p in table.values():
            children.setdefault(p.ppid, []).append(p)
        cands: list[Candidate] = []
        names: dict[ProcKey, str] = {}
        claimed: set[int] = set()
        for p in table.values():
            if p.pid == self.own_pid:
                continue
            command = (
                parse_worker_command(p.cmdline) if _is_worker_cli(p.cmdline) is not None else None
            )
            if command is None or not command.same_scheduler(self.scheduler_address):
                continue
            if not command.nanny:
                procs = [p]
            else:
                procs = []
                for child in children.get(p.pid, []):
                    joined = " ".join(child.cmdline)
                    if any(h in joined for h in _MP_HELPERS):
                        continue
                    if _MP_FORKSERVER in joined:
                        procs.extend(children.get(child.pid, []))
                    else:
                        procs.append(child)
            cmd_names = command.names()
            for q in procs:
                key = (q.pid, q.start_time)
                claimed.add(q.pid)
                cands.append(Candidate(key, p.pid, command))
                if cmd_names is not None and len(cmd_names) == 1 and len(procs) == 1:
                    names[key] = next(iter(cmd_names))
        unverified = [
            (p.pid, p.start_time)
            for p in table.values()
            if p.pid not in claimed
            and p.pid != self.own_pid
            and "--multiprocessing-fork" in p.cmdline
            and not any(h in " ".join(p.cmdline) for h in _MP_HELPERS)
        ]
        return cands, unverified, names

    def _match(
        self,
        cands: list[Candidate],
        unverified: list[ProcKey],
        table: Mapping[int, _Proc],
        workers: Mapping[str, WorkerInfo],
        now: float,
    ) -> dict[ProcKey, tuple[str, str]]:
        if not workers:
            return {}
        first = match(cands, workers, self._previous, None)
        unmatched_workers = [a for a in workers if a not in {a for a, _ in first.values()}]
        if not unmatched_workers:
            return first
        # Sockets are read only while some worker is unmatched, and a process's sockets are
        # read again only if a worker appeared since the last read (the cache keeps them).
        newest = max(self._first_seen.get(a, now) for a in unmatched_workers)
        enriched: list[Candidate] = []
        for c in cands:
            host_key = None
            if c.host_pid is not None and c.host_pid in table:
                host_key = (c.host_pid, table[c.host_pid].start_time)
            listening = self._sockets(c.key, newest, now) if c.key not in first else None
            host_listening = (
                self._sockets(host_key, newest, now)
                if host_key is not None and host_key != c.key and c.key not in first
                else None
            )
            enriched.append(Candidate(c.key, c.host_pid, c.command, listening, host_listening))
        for key in unverified:
            if key in self._previous:
                enriched.append(Candidate(key, None, None))
                continue
            listening = self._sockets(key, newest, now)
            if listening:
                enriched.append(Candidate(key, None, None, listening))
        return match(enriched, workers, self._previous, self.local_hosts())

    def _sockets(self, key: ProcKey, newest_worker: float, now: float) -> Listening | None:
        cached = self._cache.listening.get(key)
        if cached is not None and (cached[1] is None or cached[0] >= newest_worker):
            return cached[1]  # denied stays denied; otherwise fresh enough
        try:
            value: Listening | None = self._listening(psutil.Process(key[0]))
        except psutil.NoSuchProcess:
            return None
        except psutil.AccessDenied:
            value = None
        self._cache.listening[key] = (now, value)
        return value

    async def fetch(self, workers: Mapping[str, WorkerInfo]) -> SourceResult:
        """The source plug-in's fetch: ``read`` in a thread (it does blocking /proc I/O)."""
        reading = await asyncio.to_thread(self.read, workers)
        return source_result(reading)

    async def close(self) -> None:
        """Nothing to release: each read opens and closes its own /proc files."""


def source_result(reading: LocalReading) -> SourceResult:
    """What a read of the process table contributes: direct RSS by worker address, the
    processes the scheduler has not reported, and how many could not be read."""
    if not reading.ok:
        raise SourceError(REASON_UNREADABLE, "the process table is unreadable")
    rss = {a: p.rss for a, p in reading.matched.items() if p.rss is not None}
    return SourceResult(
        rss=rss,
        local_only=_local_only(reading.unmatched),
        gauges={EXPORTER_LOCAL_UNREADABLE_PROCESSES: float(reading.denied)},
    )


def _local_only(processes: tuple[LocalProcess, ...]) -> tuple[LocalOnlyProcess, ...]:
    """Unmatched processes with a readable RSS, named by ``--name`` or ``pid:<pid>``."""
    procs = [p for p in processes if p.rss is not None]
    names = [p.name or f"pid:{p.pid}" for p in procs]
    out = []
    for p, name in zip(procs, names, strict=True):
        if names.count(name) > 1:  # two nannies with the same --name: keep series distinct
            name = f"pid:{p.pid}"
        out.append(LocalOnlyProcess(name=name, pid=p.pid, rss=p.rss or 0))
    return tuple(out)
