"""Matching local processes to scheduler workers.

``match`` is pure: it takes what the process table and the scheduler said, so the cases a
real machine here cannot produce (another UID's sockets refused, several pods' worth of
workers, a scheduler entry outliving its process) are written as plain data. Real processes
and sockets are in tests/unit/test_process.py; real ``dask worker`` processes and a real nanny
restart in tests/integration/test_sidecar.py.
"""

from __future__ import annotations

import pytest

from dask_memory_exporter.cmdline import WorkerCommand, parse_worker_command
from dask_memory_exporter.matching import Candidate, match, same_scheduler
from dask_memory_exporter.scheduler import WorkerInfo
from tests.support.workers import NOW, MiB, info, workers


def child(pid: int, host: int, command: WorkerCommand | None = None, **kw: object) -> Candidate:
    """A process started at NOW - 100 by the ``dask worker`` process ``host``."""
    return Candidate((pid, NOW - 100), host, command or WorkerCommand(), **kw)  # type: ignore[arg-type]


def cmd(*args: str) -> WorkerCommand:
    c = parse_worker_command(("/usr/bin/python", "/usr/bin/dask", "worker", *args))
    assert c is not None
    return c


# --- by command line and process tree (another UID: no sockets) ---------------------------
def test_one_worker_per_pod_matches_by_elimination() -> None:
    """The usual Kubernetes layout, sidecar of another UID: no sockets, no options."""
    ws = workers(info("tcp://10.0.0.5:40123"), info("tcp://10.0.0.6:40123"))
    got = match([child(20, 10)], ws, {}, frozenset({"10.0.0.5", "127.0.0.1"}))
    assert got == {(20, NOW - 100): "tcp://10.0.0.5:40123"}


def test_remote_workers_are_not_candidates() -> None:
    ws = workers(info("tcp://10.0.0.6:40001"))
    assert match([child(21, 10)], ws, {}, frozenset({"10.0.0.5"})) == {}


def test_worker_with_a_host_name_may_be_local() -> None:
    """A host name may resolve to one of this namespace's IPs: it is not ruled out."""
    ws = workers(info("tcp://worker-0.dask:40001"))
    c = child(21, 10)
    assert match([c], ws, {}, frozenset({"10.0.0.5"})) == {c.key: "tcp://worker-0.dask:40001"}


A, B = "tcp://10.0.0.5:40001", "tcp://10.0.0.5:40002"


@pytest.mark.parametrize(
    ("options", "a", "b"),
    [
        (["--name", "x"], info(A, "x"), info(B, "y")),
        (["--nthreads", "2"], info(A, nthreads=2), info(B, nthreads=4)),
        (["--memory-limit", "1GiB"], info(A, limit=1024 * MiB), info(B, limit=2048 * MiB)),
        (["--worker-port", "40000:40001"], info(A), info(B)),
        (["--nanny-port", "9001"], info(A), info(B)),
        (["--no-nanny"], info(A, nanny=None), info(B)),
        ([], info(A), info(B, nanny=None)),  # a nanny host's child has a nanny
        (["--host", "10.0.0.5"], info(A), info("tcp://10.0.0.6:40002")),
    ],
)
def test_each_option_tells_two_workers_apart(
    options: list[str], a: WorkerInfo, b: WorkerInfo
) -> None:
    """Two workers differing only in one option: that option alone picks the right one."""
    c = child(21, 10, cmd("tcp://s:8786", *options))
    assert match([c], workers(a, b), {}, None) == {c.key: A}
    assert match([c], workers(b), {}, None) == {}


def test_memory_limit_does_not_constrain_several_workers() -> None:
    """With --nworkers N the limit given is split among the workers: it says nothing."""
    c = child(21, 10, cmd("--nworkers", "2", "--memory-limit", "2GiB"))
    assert match([c], workers(info(A, limit=1024 * MiB)), {}, None) == {c.key: A}


def test_several_children_without_sockets_stay_unmatched() -> None:
    """`--nworkers 2` as another UID: the command line cannot tell the children apart."""
    c = cmd("tcp://s:8786", "--nworkers", "2", "--name", "w")
    ws = workers(info(A, "w-0"), info(B, "w-1"))
    assert match([child(21, 10, c), child(22, 10, c)], ws, {}, frozenset({"10.0.0.5"})) == {}


def test_two_nannies_with_identical_options_stay_unmatched() -> None:
    ws = workers(info(A), info(B))
    assert match([child(31, 30), child(41, 40)], ws, {}, None) == {}


def test_options_and_elimination_settle_two_nannies() -> None:
    """Two `dask worker` processes in one place, sockets refused: --name settles one, and the
    other is then the only candidate left (a fixpoint, not one pass)."""
    ws = workers(
        info("tcp://127.0.0.1:40001", "named"),
        info("tcp://127.0.0.1:40002", nthreads=2),
    )
    a = child(31, 30, cmd("--name", "named"))
    b = child(41, 40, cmd())
    got = match([b, a], ws, {}, frozenset({"127.0.0.1"}))
    assert got == {a.key: "tcp://127.0.0.1:40001", b.key: "tcp://127.0.0.1:40002"}


def test_restarted_worker_is_not_matched_to_its_predecessor() -> None:
    """After a nanny restart the scheduler may still list the old address for a moment; the
    new process started after that worker was last heard of, so it is not the old one."""
    old = info("tcp://10.0.0.5:40001", last_seen=NOW - 200)
    c = child(22, 10)  # started at NOW - 100
    assert match([c], workers(old), {}, None) == {}
    new = info("tcp://10.0.0.5:40777", last_seen=NOW)
    assert match([c], workers(old, new), {}, None) == {c.key: new.address}


# --- by listening sockets (same UID) -------------------------------------------------------
def test_listening_port_tells_several_children_apart() -> None:
    ws = workers(info(A), info(B))
    a = child(21, 10, listening=frozenset({("10.0.0.5", 40002), ("0.0.0.0", 8788)}))
    b = child(22, 10, listening=frozenset({("0.0.0.0", 40001)}))
    got = match([a, b], ws, {}, frozenset({"10.0.0.5"}))
    assert got == {a.key: B, b.key: A}


def test_listening_on_another_ip_is_not_the_worker() -> None:
    """Same port, another interface: a different server (e.g. another pod's namespace)."""
    c = Candidate((50, NOW - 100), None, None, frozenset({("10.0.0.9", 40001)}))
    assert match([c], workers(info(A)), {}, None) == {}


def test_ipv6_worker_address() -> None:
    ws = workers(info("tcp://[::1]:40001"), info("tcp://[::1]:40002"))
    c = Candidate((50, NOW - 100), None, None, frozenset({("::1", 40002)}))
    assert match([c], ws, {}, None) == {c.key: "tcp://[::1]:40002"}


def test_nanny_port_ties_a_child_to_its_worker() -> None:
    ws = workers(
        info(A, nanny="tcp://10.0.0.5:9001"),
        info(B, nanny="tcp://10.0.0.5:9002"),
    )
    c = child(21, 10, host_listening=frozenset({("10.0.0.5", 9002)}))
    assert match([c], ws, {}, None) == {c.key: B}


def test_unverified_process_needs_a_port() -> None:
    """A spawned child of some other parent (a LocalCluster) counts only by its socket."""
    ws = workers(info("tcp://127.0.0.1:40001"))
    stray = Candidate((50, NOW - 100), None, None)
    assert match([stray], ws, {}, None) == {}
    seen = Candidate((50, NOW - 100), None, None, frozenset({("127.0.0.1", 40001)}))
    assert match([seen], ws, {}, None) == {seen.key: "tcp://127.0.0.1:40001"}


# --- across polls ----------------------------------------------------------------------------
def test_sticky_match_survives_ambiguity_and_drops_with_the_address() -> None:
    c = cmd("--nworkers", "2")
    a, b = child(21, 10, c), child(22, 10, c)
    ws = workers(info(A), info(B))
    assert match([a, b], ws, {}, None) == {}  # without history: indistinguishable
    previous = {a.key: B, b.key: A}
    assert match([a, b], ws, previous, None) == previous
    del ws[B]
    assert match([a, b], ws, previous, None) == {b.key: A}


def test_an_address_never_goes_to_two_processes() -> None:
    """A stale sticky entry and a listening socket claiming the same address: one wins."""
    a = child(21, 10)
    b = Candidate((50, NOW - 100), None, None, frozenset({("10.0.0.5", 40001)}))
    got = match([a, b], workers(info(A)), {a.key: A}, None)
    assert got == {a.key: A}


# --- which scheduler a command line points at ------------------------------------------------
def test_other_schedulers_workers_are_not_ours() -> None:
    c = cmd("tcp://10.0.0.1:8786")
    assert same_scheduler(c, "tcp://10.0.0.1:8786")
    assert same_scheduler(c, "tcp://dask-scheduler:8786")  # a name may be that IP
    assert not same_scheduler(c, "tcp://10.0.0.1:9999")
    assert not same_scheduler(c, "tcp://10.0.0.2:8786")
    assert same_scheduler(cmd(), "tcp://10.0.0.2:8786")  # --scheduler-file or env: unknown
    assert same_scheduler(c, None)  # no scheduler configured: every worker host counts
