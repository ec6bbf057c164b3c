"""The preload as an HPC user runs it: ``dask scheduler --preload dask_memory_exporter.preload``
in its own process, real ``dask worker`` processes, and a real Prometheus that finds the
exporter only through the file_sd file the preload writes (docs/hpc.md).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from dask_memory_exporter import names as n
from tests.support.promstack import run_prometheus, run_tool

BIN = Path(sys.executable).parent
JOB = "dask-memory-exporter"
PRELOAD = "dask_memory_exporter.preload"


def _wait_for_file(path: Path, proc: subprocess.Popen[str], timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"{proc.args[0]} exited with {proc.returncode}"
        assert time.monotonic() < deadline, f"{path} not written within {timeout}s"
        time.sleep(0.1)
    return path.read_text()


def _stop(proc: subprocess.Popen[str], sig: int = signal.SIGTERM, grace: float = 30) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        raise


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for p in reversed(started):
        if p.poll() is None:
            p.kill()
            p.wait(10)


def test_prometheus_finds_the_preload_through_file_sd(
    tmp_path: Path, procs: list[subprocess.Popen[str]]
) -> None:
    sd_dir = tmp_path / "file_sd"
    sd_dir.mkdir()
    file_sd = sd_dir / "mycluster.json"
    scheduler_file = tmp_path / "scheduler.json"
    scrape = {
        "job_name": JOB,
        "scrape_interval": "1s",
        "scrape_timeout": "1s",
        "file_sd_configs": [{"files": [str(sd_dir / "*.json")], "refresh_interval": "1s"}],
    }
    log_path = tmp_path / "scheduler.log"
    with run_prometheus(extra_scrape_configs=[scrape]) as prom, log_path.open("w") as log:
        scheduler = subprocess.Popen(
            [
                str(BIN / "dask"), "scheduler",
                "--host", "127.0.0.1", "--port", "0",
                "--dashboard-address", "127.0.0.1:0",
                "--scheduler-file", str(scheduler_file),
                "--preload", PRELOAD,
                "--memory-exporter-port", "0",  # the file_sd file names the port it got
                "--memory-exporter-host", "127.0.0.1",
                "--memory-exporter-file-sd", str(file_sd),
                "--memory-exporter-cluster", "mycluster",
            ],
            stdout=subprocess.DEVNULL, stderr=log, text=True,
        )  # fmt: skip
        procs.append(scheduler)
        groups = json.loads(_wait_for_file(file_sd, scheduler))
        assert groups[0]["labels"] == {"cluster": "mycluster"}
        (target,) = groups[0]["targets"]
        # The file is what Prometheus itself accepts as a file_sd file.
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump({"scrape_configs": [scrape]}))
        check = run_tool("promtool", "check", "config", tmp_path / "prometheus.yml")
        assert check.returncode == 0, check.stdout + check.stderr

        address = json.loads(_wait_for_file(scheduler_file, scheduler))["address"]
        workers = subprocess.Popen(
            [
                str(BIN / "dask"), "worker", address,
                "--nworkers", "2", "--nthreads", "1", "--memory-limit", "300MiB",
                "--host", "127.0.0.1", "--no-dashboard",
            ],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        procs.append(workers)

        sel = f'{{job="{JOB}",cluster="mycluster",instance="{target}"}}'
        prom.wait_for(
            f"count(dask_memory_worker_process_bytes{sel} > 0) == 2",
            timeout=90,
        )
        assert prom.query_scalar(f"{n.SCHEDULER_WORKERS}{sel}") == 2
        assert prom.query_scalar(f"{n.SCHEDULER_UP}{sel}") == 1

        # Ctrl-C on the scheduler: it closes, the exporter with it, and the file goes.
        _stop(workers)
        assert _stop(scheduler, signal.SIGINT) == 0
        assert not file_sd.exists()
        stderr = log_path.read_text()
        assert "Traceback" not in stderr, stderr
        assert "dask-memory-exporter preload: stopped" in stderr
        # Prometheus drops the target with the file.
        deadline = time.monotonic() + 60
        while any(t["labels"].get("instance") == target for t in prom.targets()):
            assert time.monotonic() < deadline, "the target outlived its file_sd file"
            time.sleep(0.5)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--memory-exporter-port", "http"], "'http' is not a valid integer"),
        (["--memory-exporter-prot", "1"], "No such option '--memory-exporter-prot'"),
    ],
)
def test_bad_option_on_the_command_line_is_one_line_exit_2(argv: list[str], expected: str) -> None:
    """``dask scheduler`` checks the preload's options before it starts."""
    done = subprocess.run(
        [str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", "0",
         "--dashboard-address", "127.0.0.1:0", "--preload", PRELOAD, *argv],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and expected in errors[0], done.stderr
    assert "Traceback" not in done.stderr and "Usage:" not in done.stderr
