"""LocalProcessSource: RSS of the Dask worker processes beside the exporter, read from the OS.

Sidecar mode (``--mode local`` or ``both``). The exporter runs on the workers' host, or in
their Kubernetes pod with ``shareProcessNamespace: true``, finds the Dask worker processes in
the process table and reads their RSS with psutil's ``memory_info()`` (``/proc/<pid>/statm``:
one small read, never ``smaps``, which is slow on big processes and needs ptrace rights).
The figure comes from the kernel, so it stays live while a task holding the GIL freezes the
worker's event loop, its heartbeats and its own ``/metrics``.

What counts as a worker process:

- the children of a ``dask worker`` process (the nanny host; ``cmdline.py`` tells one from
  its command line), minus multiprocessing's helpers (resource tracker, forkserver; the
  forkserver's own children count). These are the processes whose RSS Dask's memory manager
  and the nanny judge;
- a ``dask worker --no-nanny`` process itself;
- any other spawned Python process (a LocalCluster's workers, a custom launcher) only when it
  is seen listening on a worker address the scheduler reports: that needs the worker's UID.

Which process is which worker is decided by ``matching.match`` from what this module reads;
a process left unmatched is still reported, with its RSS only. This module does not decide
what is exported (``snapshot.Poller``) and reads no settings.

The procfs root. psutil reads procfs only through its process-wide ``psutil.PROCFS_PATH``
(looked up on every call), so a host's procfs mounted at ``/host/proc`` changes what every
psutil user in the process sees, distributed's own monitors included. That is a start-up
decision, made once and visibly by the entry point with ``use_proc_root``; a
``LocalProcessSource`` only checks that its root is the one in force and refuses another
rather than switching it behind its caller's back. Reading ``stat``/``statm``/``cmdline`` by
hand under an injectable root was the alternative, but matching by listening port also needs
each process's sockets (``fd/`` links joined with ``net/tcp{,6}``), which psutil already
reads correctly; re-implementing that is more code to get wrong than one global set once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import psutil

from .cmdline import parse_worker_command
from .gpu_nvml import WORKER_GPU_PROCESS_MEMORY_BYTES, NvmlReader
from .matching import Candidate, Listening, ProcKey, match, same_scheduler
from .names import EXPORTER_LOCAL_UNREADABLE_PROCESSES, SOURCE_LOCAL, Metric
from .source import LocalOnlyProcess, SourceError, SourceResult, WorkerInfo

__all__ = ["LocalProcess", "LocalProcessSource", "LocalReading", "use_proc_root"]

logger = logging.getLogger(__name__)

# A command line cached earlier than this after the process started may still be its parent's
# (between fork and exec of a spawned child): read it again next time.
_CMDLINE_SETTLE_SECONDS = 2.0
_MP_HELPERS = ("multiprocessing.resource_tracker", "multiprocessing.semaphore_tracker")
_MP_FORKSERVER = "multiprocessing.forkserver"
REASON_UNREADABLE = "unreadable"
"""The source's one failure: the process table could not be read at all."""


def use_proc_root(root: str) -> None:
    """Make psutil read processes from the procfs at ``root``, for the whole process.

    Call once at start-up, before creating a ``LocalProcessSource``, and only from the
    program's entry point: every psutil call in the process reads ``root`` afterwards.
    """
    root = os.path.normpath(root)
    if root != os.path.normpath(psutil.PROCFS_PATH):
        logger.info("reading processes from %s", root)
    psutil.PROCFS_PATH = root


@dataclass(frozen=True, slots=True)
class LocalProcess:
    """One Dask worker process beside the exporter, with the RSS read in this poll."""

    pid: int
    start_time: float
    rss: int | None
    """Bytes resident; None where reading it was denied (the heartbeat's figure is used)."""
    address: str | None = None
    """The scheduler address it was matched to; None if unmatched."""
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
    """Worker processes whose RSS could not be read (permission denied): those in
    ``processes`` with ``rss`` None."""

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


def _process(key: ProcKey) -> psutil.Process:
    """The process seen in the scan; NoSuchProcess if its pid now belongs to another one."""
    pid, start = key
    proc = psutil.Process(pid)
    if proc.create_time() != start:
        raise psutil.NoSuchProcess(pid, msg="pid reused since the scan")
    return proc


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
    ``proc_root`` is the procfs to read, and must be the one psutil reads (``use_proc_root``
    sets that, see the module docstring); it also names the procfs in log messages.
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
        gpu: NvmlReader | None = None,
    ) -> None:
        """``gpu``: where given, the device memory of each matched worker process is read
        through NVML too (``dask_memory_worker_gpu_process_memory_bytes``)."""
        if os.path.normpath(proc_root) != os.path.normpath(psutil.PROCFS_PATH):
            raise ValueError(
                f"procfs root {proc_root!r} is not the one psutil reads "
                f"({psutil.PROCFS_PATH!r}); call use_proc_root({proc_root!r}) once at start-up"
            )
        self.proc_root = proc_root
        self.gpu = gpu
        self.families = (WORKER_GPU_PROCESS_MEMORY_BYTES,) if gpu is not None else ()
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
        self._previous = matched

        out: list[LocalProcess] = []
        host_keys = {c.key for c in cands}
        for key in host_keys | matched.keys():
            pid, start = key
            rss: int | None
            try:
                rss = self._rss(_process(key))
            except psutil.NoSuchProcess:
                continue  # gone since the scan: skipped, no traceback
            except psutil.AccessDenied:
                rss = None
                if key not in self._warned_denied:
                    self._warned_denied.add(key)
                    logger.warning(
                        "permission denied reading the RSS of worker process %d; its "
                        "heartbeat's figures are used instead (see docs/sidecar.md)",
                        pid,
                    )
            if rss == 0:
                continue  # a zombie (exited, not yet reaped): as good as gone
            out.append(LocalProcess(pid, start, rss, matched.get(key), names.get(key)))
        self._warned_denied &= {c.key for c in cands} | set(unverified)
        out.sort(key=lambda p: p.pid)
        denied = sum(p.rss is None for p in out)
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
            command = parse_worker_command(p.cmdline)
            if command is None or not same_scheduler(command, self.scheduler_address):
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
    ) -> dict[ProcKey, str]:
        if not workers:
            return {}
        first = match(cands, workers, self._previous, None)
        unmatched_workers = workers.keys() - set(first.values())
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
            value: Listening | None = self._listening(_process(key))
        except psutil.NoSuchProcess:
            return None
        except psutil.AccessDenied:
            value = None
        self._cache.listening[key] = (now, value)
        return value

    async def fetch(self, workers: Mapping[str, WorkerInfo]) -> SourceResult:
        """The source plug-in's fetch: ``read`` in a thread (it does blocking /proc I/O)."""
        reading = await asyncio.to_thread(self.read, workers)
        result = source_result(reading)
        if self.gpu is None:
            return result
        device = await asyncio.to_thread(self.gpu.read)
        values = {
            a: {WORKER_GPU_PROCESS_MEMORY_BYTES: float(device[p.pid])}
            for a, p in reading.matched.items()
            if p.pid in device
        }
        # Processes the scheduler has not reported (all of them in mode local) too, by pid.
        local_only = tuple(
            dataclasses.replace(
                p, values={**p.values, WORKER_GPU_PROCESS_MEMORY_BYTES: float(device[p.pid])}
            )
            if p.pid in device
            else p
            for p in result.local_only
        )
        return dataclasses.replace(result, values=values, local_only=local_only)

    async def close(self) -> None:
        """Nothing to release: each read opens and closes its own /proc files (NVML stays
        initialised for the exporter's lifetime: the next fetch needs it again)."""


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
