"""Tie local worker processes to the scheduler's workers: the pure matcher.

``match`` takes what the process table showed (``Candidate``: a process, the ``dask worker``
host that started it, their listening sockets where readable) and what the scheduler reports
(``WorkerInfo``), and returns the worker address of each process it can tell, strongest
evidence first:

1. sticky: a (pid, start time) matched before keeps its address while the scheduler lists it
   (an address never moves to another process; a nanny restart brings a new pid *and* a new
   address, which is matched afresh);
2. listening port: the process listens on the worker's address (readable with the same UID,
   or as root);
3. command line and process tree (any UID): the host's ``dask worker`` options
   (``cmdline.WorkerCommand``) and, when its sockets are readable, the nanny's listening port
   narrow the scheduler's local workers down; a host with one unmatched child and exactly one
   remaining candidate is a match. Repeated until nothing changes, so each match can settle
   another by elimination.

Ambiguity is left unmatched, never guessed: a wrong match would put one worker's memory on
another's series. No I/O and no clock here, so every layout can be tested as plain data;
reading the process table is ``process.py``'s job.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .cmdline import WorkerCommand
from .scheduler import WorkerInfo

__all__ = ["Candidate", "Listening", "ProcKey", "allows", "match", "same_scheduler"]

ProcKey = tuple[int, float]
"""(pid, start time): a pid alone can be reused by another process."""
Listening = frozenset[tuple[str, int]]
"""Listening TCP sockets of a process as (ip, port)."""

_ANY_IP = ("0.0.0.0", "::", "")


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


# --- addresses ---------------------------------------------------------------------------
def _host_port(address: str) -> tuple[str, int] | None:
    """``tcp://[::1]:8786`` -> ``("::1", 8786)``; None without a numeric port."""
    loc = address.split("://", 1)[-1]
    host, sep, port = loc.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def _port(address: str) -> int | None:
    hp = _host_port(address)
    return hp[1] if hp else None


def _is_ip(host: str) -> bool:
    """True for a literal IPv4/IPv6 address; a host name may resolve to anything."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _listens_on(listening: Listening, address: str | None) -> bool:
    """Does a process with these sockets serve ``address`` (directly or on a wildcard IP)?"""
    hp = _host_port(address) if address is not None else None
    if hp is None:
        return False
    host, port = hp
    return any(p == port and ip in (host, *_ANY_IP) for ip, p in listening)


# --- a command line against the scheduler's view ---------------------------------------------
def allows(command: WorkerCommand, w: WorkerInfo) -> bool:
    """Could ``w`` be one of the workers ``command`` started? Unknown options allow anything."""
    names = command.names()
    if names is not None and w.name not in names:
        return False
    if command.nthreads is not None and w.nthreads != command.nthreads:
        return False
    if (
        command.memory_limit is not None
        and command.nworkers == 1
        and (w.memory_limit or 0) != command.memory_limit
    ):
        return False
    if command.worker_ports is not None and _port(w.address) not in command.worker_ports:
        return False
    if command.nanny_ports is not None and (
        w.nanny is None or _port(w.nanny) not in command.nanny_ports
    ):
        return False
    if command.nanny != (w.nanny is not None):
        return False
    return not (command.host is not None and _is_ip(command.host) and w.host != command.host)


def same_scheduler(command: WorkerCommand, address: str | None) -> bool:
    """False only if ``command`` clearly names another scheduler than ``address``.

    A host name may be any IP, so only a different port, or two different IPs, tell.
    """
    if not command.scheduler or not address:
        return True
    mine, theirs = _host_port(command.scheduler), _host_port(address)
    if mine is None or theirs is None:
        return True
    if mine[1] != theirs[1]:
        return False
    return not (_is_ip(mine[0]) and _is_ip(theirs[0]) and mine[0] != theirs[0])


# --- the matcher ---------------------------------------------------------------------------
def match(
    candidates: Iterable[Candidate],
    workers: Mapping[str, WorkerInfo],
    previous: Mapping[ProcKey, str],
    local_hosts: frozenset[str] | None,
) -> dict[ProcKey, str]:
    """Tie local processes to scheduler workers: {process key: worker address}.

    ``previous`` is the last call's result (for stickiness). ``local_hosts`` are the IP
    addresses of this network namespace (None: unknown); a worker whose host is another IP
    cannot be one of ours. See the module docstring for the order.
    """
    cands = list(candidates)
    out: dict[ProcKey, str] = {}
    taken: set[str] = set()

    def assign(c: Candidate, address: str) -> None:
        out[c.key] = address
        taken.add(address)

    for c in cands:  # 1. sticky
        addr = previous.get(c.key)
        if addr is not None and addr in workers and addr not in taken:
            assign(c, addr)
    for c in cands:  # 2. listening port
        if c.key in out or not c.listening:
            continue
        hits = [a for a in workers if a not in taken and _listens_on(c.listening, a)]
        if len(hits) == 1:
            assign(c, hits[0])

    def local(w: WorkerInfo) -> bool:
        return local_hosts is None or not _is_ip(w.host) or w.host in local_hosts

    def could_be(c: Candidate, w: WorkerInfo) -> bool:
        command = c.command or WorkerCommand()
        return (
            local(w)
            and allows(command, w)
            # A worker last heard of before this process started belongs to a process that
            # is gone (the nanny restarted it under a new address).
            and w.last_seen >= c.key[1]
            and (
                c.host_listening is None
                or not command.nanny
                or _listens_on(c.host_listening, w.nanny)
            )
        )

    groups: dict[int, list[Candidate]] = {}
    for c in cands:
        if c.host_pid is not None:
            groups.setdefault(c.host_pid, []).append(c)
    changed = True
    while changed:  # 3. command line and process tree, to a fixpoint
        changed = False
        for members in groups.values():
            unmatched = [c for c in members if c.key not in out]
            if len(unmatched) != 1:
                continue
            c = unmatched[0]
            options = [a for a, w in workers.items() if a not in taken and could_be(c, w)]
            if len(options) == 1:
                assign(c, options[0])
                changed = True
    return out
