"""Settings and the command line: defaults, environment, and one-line errors with exit 2."""

from __future__ import annotations

import subprocess
import sys

import dask.config
import pytest

from dask_memory_exporter.cli import main
from dask_memory_exporter.config import ConfigError, load_settings


def test_defaults_and_dask_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DASK_SCHEDULER_ADDRESS", raising=False)
    s = load_settings({"scheduler": "tcp://127.0.0.1:8786"})
    assert (s.listen_host, s.listen_port, s.mode) == ("0.0.0.0", 9787, "scheduler")
    assert s.thresholds == {"target": 0.6, "spill": 0.7, "pause": 0.8, "terminate": 0.95}
    assert s.recent_to_old_time == 30
    with dask.config.set(
        {
            "distributed.worker.memory.pause": 0.5,
            "distributed.worker.memory.target": False,
            "distributed.worker.memory.recent-to-old-time": "5s",
        }
    ):
        s = load_settings({"scheduler": "tcp://127.0.0.1:8786"})
    assert s.thresholds == {"spill": 0.7, "pause": 0.5, "terminate": 0.95}
    assert s.recent_to_old_time == 5


def test_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", "tls://sched:8786")
    monkeypatch.setenv("DASK_MEMORY_EXPORTER_LISTEN", "127.0.0.1:9999")
    monkeypatch.setenv("DASK_MEMORY_EXPORTER_POLL_INTERVAL", "2s")
    s = load_settings({})
    assert (s.scheduler, s.listen_port, s.poll_interval) == ("tls://sched:8786", 9999, 2.0)
    monkeypatch.setenv("DASK_MEMORY_EXPORTER_SCHEDULER", "tcp://other:1")
    assert load_settings({}).scheduler == "tcp://other:1"
    assert load_settings({"scheduler": "tcp://cli:2"}).scheduler == "tcp://cli:2"


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"scheduler": "tcp://host-without-port"}, "scheduler"),
        ({"scheduler": "nonsense://x:1"}, "scheduler"),
        ({"scheduler": "tcp://h:1", "listen": "9787"}, "listen"),
        ({"scheduler": "tcp://h:1", "listen": "h:99999"}, "listen"),
        ({"scheduler": "tcp://h:1", "spill": 1.5}, "spill"),
        ({"scheduler": "tcp://h:1", "poll_interval": "soon"}, "poll-interval"),
        ({"scheduler": "tcp://h:1", "mode": "everything"}, "mode"),
        ({}, "DASK_SCHEDULER_ADDRESS"),
    ],
)
def test_bad_input_is_one_line(
    monkeypatch: pytest.MonkeyPatch, overrides: dict[str, object], fragment: str
) -> None:
    monkeypatch.delenv("DASK_SCHEDULER_ADDRESS", raising=False)
    with pytest.raises(ConfigError) as e:
        load_settings(overrides)
    assert fragment in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "argv",
    [
        ["serve", "--scheduler", "tcp://nope"],
        ["serve", "--scheduler", "tcp://h:1", "--listen", "x"],
        ["serve", "--scheduler", "tcp://h:1", "--spill", "abc"],
        ["serve", "--bogus"],
        ["generate", "rules", "--set", "nope=1"],
        ["generate", "rules", "--set", "paused_for=abc", "--output-dir", "/nonexistent"],
    ],
)
def test_cli_exit_2_without_traceback(argv: list[str]) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "dask_memory_exporter", *argv],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("dask-memory-exporter: error:")


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("dask-memory-exporter ")
