"""Matching local processes to scheduler workers, and the Poller's use of local readings.

``match`` is pure: it takes what the process table and the scheduler said, so the cases a
real machine here cannot produce (another UID's sockets refused, several pods' worth of
workers, a scheduler entry outliving its process) are written as plain data. Real processes,
real sockets and a real nanny restart are in tests/integration/test_sidecar.py.
"""

from __future__ import annotations

import pytest

from dask_memory_exporter.memory import WorkerReading
from dask_memory_exporter.process import (
    Candidate,
    WorkerCommand,
    match,
    parse_worker_command,
)
from dask_memory_exporter.scheduler import WorkerInfo

MiB = 2**20
NOW = 10_000.0


def info(
    address: str,
    name: str | None = None,
    *,
    nanny: str | None = "auto",
    nthreads: int = 1,
    limit: int | None = 300 * MiB,
    last_seen: float = NOW,
    process: int = 100 * MiB,
) -> WorkerInfo:
    host = address.split("://")[1].rsplit(":", 1)[0]
    return WorkerInfo(
        address=address,
        name=name or address,
        host=host,
        nthreads=nthreads,
        memory_limit=limit,
        status="running",
        last_seen=last_seen,
        nanny=f"tcp://{host}:9{address[-3:]}" if nanny == "auto" else nanny,
        reading=WorkerReading(process, 10 * MiB, 0, 0, last_seen),
    )


def workers(*ws: WorkerInfo) -> dict[str, WorkerInfo]:
    return {w.address: w for w in ws}


def child(pid: int, host: int, command: WorkerCommand | None = None, **kw: object) -> Candidate:
    return Candidate((pid, NOW - 100), host, command or WorkerCommand(), **kw)  # type: ignore[arg-type]


def cmd(*args: str) -> WorkerCommand:
    c = parse_worker_command(("/usr/bin/python", "/usr/bin/dask", "worker", *args))
    assert c is not None
    return c


# --- the command line ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv",
    [
        ["/opt/venv/bin/python3", "/opt/venv/bin/dask", "worker", "tcp://s:8786"],
        ["dask", "worker", "tcp://s:8786"],
        ["/usr/bin/python", "/usr/local/bin/dask-worker", "tcp://s:8786"],
        ["python", "-m", "distributed.cli.dask_worker", "tcp://s:8786"],
        ["python", "-m", "dask", "worker", "tcp://s:8786"],
    ],
)
def test_worker_command_lines_are_recognised(argv: list[str]) -> None:
    c = parse_worker_command(argv)
    assert c is not None and c.scheduler == "tcp://s:8786"


@pytest.mark.parametrize(
    "argv",
    [
        ["python", "-c", "from multiprocessing.spawn import spawn_main; spawn_main()"],
        ["dask", "scheduler"],
        ["python", "-m", "pytest", "tests/worker"],
        [],
    ],
)
def test_other_command_lines_are_not_workers(argv: list[str]) -> None:
    assert parse_worker_command(argv) is None


def test_only_explicit_options_constrain() -> None:
    c = cmd("tcp://s:8786", "--name", "w", "--nthreads", "2", "--memory-limit", "4GiB")
    assert (c.name, c.nthreads, c.memory_limit, c.nworkers, c.nanny) == ("w", 2, 4 * 2**30, 1, True)
    bare = cmd("tcp://s:8786")
    assert (bare.name, bare.nthreads, bare.memory_limit, bare.worker_ports) == (None,) * 4
    assert cmd("--memory-limit", "auto").memory_limit is None
    assert cmd("--memory-limit", "0.5").memory_limit is None  # a fraction of the host
    assert cmd("--no-nanny").nanny is False
    assert cmd("--worker-port", "9000:9002").worker_ports == {9000, 9001, 9002}
    assert cmd("--nworkers", "3", "--name", "w").names() == {"w-0", "w-1", "w-2"}
    assert cmd("--bogus-option", "1") == WorkerCommand()  # unknown option: no constraints
    assert cmd("tcp://s:1", "--preload", "no_such_module").scheduler == "tcp://s:1"  # not run


def test_other_schedulers_workers_are_not_ours() -> None:
    c = cmd("tcp://10.0.0.1:8786")
    assert c.same_scheduler("tcp://10.0.0.1:8786")
    assert c.same_scheduler("tcp://dask-scheduler:8786")  # a name may be that IP
    assert not c.same_scheduler("tcp://10.0.0.1:9999")
    assert not c.same_scheduler("tcp://10.0.0.2:8786")
    assert cmd().same_scheduler("tcp://10.0.0.2:8786")  # --scheduler-file or env: unknown


# --- matching -----------------------------------------------------------------------------
def test_one_worker_per_pod_matches_by_elimination() -> None:
    """The usual Kubernetes layout, sidecar of another UID: no sockets, no options."""
    ws = workers(info("tcp://10.0.0.5:40123"), info("tcp://10.0.0.6:40123"))
    got = match([child(20, 10)], ws, {}, frozenset({"10.0.0.5", "127.0.0.1"}))
    assert got == {(20, NOW - 100): ("tcp://10.0.0.5:40123", "cmdline")}


def test_listening_port_tells_several_children_apart() -> None:
    ws = workers(info("tcp://10.0.0.5:40001"), info("tcp://10.0.0.5:40002"))
    a = child(21, 10, listening=frozenset({("10.0.0.5", 40002), ("0.0.0.0", 8788)}))
    b = child(22, 10, listening=frozenset({("0.0.0.0", 40001)}))
    got = match([a, b], ws, {}, frozenset({"10.0.0.5"}))
    assert got[a.key] == ("tcp://10.0.0.5:40002", "port")
    assert got[b.key] == ("tcp://10.0.0.5:40001", "port")


def test_several_children_without_sockets_stay_unmatched() -> None:
    """`--nworkers 2` as another UID: the command line cannot tell the children apart."""
    c = cmd("tcp://s:8786", "--nworkers", "2", "--name", "w")
    ws = workers(info("tcp://10.0.0.5:40001", "w-0"), info("tcp://10.0.0.5:40002", "w-1"))
    assert match([child(21, 10, c), child(22, 10, c)], ws, {}, frozenset({"10.0.0.5"})) == {}


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
    assert got == {
        a.key: ("tcp://127.0.0.1:40001", "cmdline"),
        b.key: ("tcp://127.0.0.1:40002", "cmdline"),
    }


def test_nanny_port_ties_a_child_to_its_worker() -> None:
    ws = workers(
        info("tcp://10.0.0.5:40001", nanny="tcp://10.0.0.5:9001"),
        info("tcp://10.0.0.5:40002", nanny="tcp://10.0.0.5:9002"),
    )
    c = child(21, 10, host_listening=frozenset({("10.0.0.5", 9002)}))
    assert match([c], ws, {}, None) == {c.key: ("tcp://10.0.0.5:40002", "cmdline")}


def test_remote_workers_are_not_candidates() -> None:
    ws = workers(info("tcp://10.0.0.6:40001"))
    assert match([child(21, 10)], ws, {}, frozenset({"10.0.0.5"})) == {}


def test_restarted_worker_is_not_matched_to_its_predecessor() -> None:
    """After a nanny restart the scheduler may still list the old address for a moment; the
    new process started after that worker was last heard of, so it is not the old one."""
    old = info("tcp://10.0.0.5:40001", last_seen=NOW - 200)
    c = child(22, 10)  # started at NOW - 100
    assert match([c], workers(old), {}, None) == {}
    new = info("tcp://10.0.0.5:40777", last_seen=NOW)
    assert match([c], workers(old, new), {}, None) == {c.key: (new.address, "cmdline")}


def test_sticky_match_survives_ambiguity_and_drops_with_the_address() -> None:
    c = cmd("--nworkers", "2")
    a, b = child(21, 10, c), child(22, 10, c)
    ws = workers(info("tcp://10.0.0.5:40001"), info("tcp://10.0.0.5:40002"))
    previous = {a.key: "tcp://10.0.0.5:40002", b.key: "tcp://10.0.0.5:40001"}
    got = match([a, b], ws, previous, None)
    assert got == {
        a.key: ("tcp://10.0.0.5:40002", "sticky"),
        b.key: ("tcp://10.0.0.5:40001", "sticky"),
    }
    del ws["tcp://10.0.0.5:40002"]
    got = match([a, b], ws, previous, None)
    assert got == {b.key: ("tcp://10.0.0.5:40001", "sticky")}


def test_unverified_process_needs_a_port() -> None:
    """A spawned child of some other parent (a LocalCluster) counts only by its socket."""
    ws = workers(info("tcp://127.0.0.1:40001"))
    stray = Candidate((50, NOW - 100), None, None)
    assert match([stray], ws, {}, None) == {}
    seen = Candidate((50, NOW - 100), None, None, frozenset({("127.0.0.1", 40001)}))
    assert match([seen], ws, {}, None) == {seen.key: ("tcp://127.0.0.1:40001", "port")}
