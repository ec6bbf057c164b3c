"""Reading a ``dask worker`` command line: which processes are worker hosts, and what their
explicit options say. Command lines are plain data here; real ``dask worker`` processes are in
tests/integration/test_sidecar.py."""

from __future__ import annotations

import pytest

from dask_memory_exporter.cmdline import WorkerCommand, parse_worker_command

GiB = 2**30


def cmd(*args: str) -> WorkerCommand:
    c = parse_worker_command(("/usr/bin/python", "/usr/bin/dask", "worker", *args))
    assert c is not None
    return c


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
        ["python", "-m", "dask"],
        ["dask"],
        # "dask worker" as arguments of another program, past the first four words
        ["python", "-m", "tool", "--flag", "dask", "worker"],
        [],
    ],
)
def test_other_command_lines_are_not_workers(argv: list[str]) -> None:
    assert parse_worker_command(argv) is None


def test_defaults_constrain_nothing() -> None:
    """A bare command leaves every option unknown: the default --memory-limit (auto) or
    --nthreads (all cores) depends on the host, so it must not narrow the match."""
    assert cmd("tcp://s:8786") == WorkerCommand(scheduler="tcp://s:8786")


def test_explicit_options_are_read() -> None:
    c = cmd("tcp://s:8786", "--name", "w", "--nthreads", "2", "--memory-limit", "4GiB")
    assert (c.name, c.nthreads, c.memory_limit, c.nworkers, c.nanny) == ("w", 2, 4 * GiB, 1, True)
    assert cmd("--memory-limit", "1000000").memory_limit == 1_000_000
    assert cmd("--host", "10.0.0.5").host == "10.0.0.5"
    assert cmd("--no-nanny").nanny is False


@pytest.mark.parametrize("limit", ["auto", "0.5", "0", "lots"])
def test_host_dependent_memory_limits_constrain_nothing(limit: str) -> None:
    assert cmd("--memory-limit", limit).memory_limit is None


@pytest.mark.parametrize(
    ("ports", "expected"),
    [
        ("9000", {9000}),
        ("9000:9002", {9000, 9001, 9002}),
        ("9000,9005:9006", {9000, 9005, 9006}),
        ("0", None),  # any free port
        ("x:9", None),
    ],
)
def test_port_options(ports: str, expected: set[int] | None) -> None:
    assert cmd("--worker-port", ports).worker_ports == expected
    assert cmd("--nanny-port", ports).nanny_ports == expected


def test_names_of_several_workers() -> None:
    assert cmd("--name", "w").names() == {"w"}
    assert cmd("--nworkers", "3", "--name", "w").names() == {"w-0", "w-1", "w-2"}
    assert cmd("--nworkers", "3").names() is None


def test_unknown_option_disables_constraints() -> None:
    """An option this distributed does not know could shift the others' values around."""
    assert cmd("--name", "w", "--bogus-option", "1") == WorkerCommand()


def test_preload_is_never_imported() -> None:
    assert cmd("tcp://s:1", "--preload", "no_such_module").scheduler == "tcp://s:1"


def test_dask_cuda_worker_is_a_host_without_constraints() -> None:
    assert parse_worker_command(["dask-cuda-worker", "tcp://s:1", "--name", "g"]) == WorkerCommand()
