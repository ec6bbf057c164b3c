"""Settings and the command line: defaults, environment, and one-line errors with exit 2."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import dask.config
import pytest

from dask_memory_exporter.cli import DEMO_OPTIONS, GENERATORS, build_parser, main
from dask_memory_exporter.config import ConfigError, Settings, load_settings

ENV_PREFIX = "DASK_MEMORY_EXPORTER_"
SCHEDULER = "tcp://127.0.0.1:8786"

# One non-default value per Settings field, as typed by a user, and the value it becomes.
# test_every_field_is_an_option_and_a_variable fails for a field missing here.
SAMPLES: dict[str, tuple[str, Any]] = {
    "scheduler": ("tcp://10.1.2.3:8786", "tcp://10.1.2.3:8786"),
    "listen": ("127.0.0.1:9999", "127.0.0.1:9999"),
    "mode": ("both", "both"),
    "poll_interval": ("2s", 2.0),
    "timeout": ("500ms", 0.5),
    "max_backoff": ("1m", 60.0),
    "stale_after": ("45s", 45.0),
    "recent_to_old_time": ("5", 5.0),
    "target": ("0.5", 0.5),
    "spill": ("false", False),
    "pause": ("off", False),
    "terminate": ("0.9", 0.9),
    "proc_root": ("/host/proc", "/host/proc"),
    "process_metrics": ("false", False),
    "nvml": ("false", False),
    "log_level": ("debug", "DEBUG"),
    "tls_ca_file": ("/certs/ca.pem", "/certs/ca.pem"),
    "tls_cert": ("/certs/cert.pem", "/certs/cert.pem"),
    "tls_key": ("/certs/key.pem", "/certs/key.pem"),
    "http_max_connections": ("64", 64),
    "http_idle_timeout": ("2s", 2.0),
    "web_config_file": ("/etc/web.yml", "/etc/web.yml"),
    "worker_probe_url": ("http://127.0.0.1:8788/health", "http://127.0.0.1:8788/health"),
    "metric_allowlist": ("dask_memory_worker_.*", "dask_memory_worker_.*"),
    "metric_denylist": (
        "process_.*,dask_memory_worker_threshold_ratio",
        "process_.*,dask_memory_worker_threshold_ratio",
    ),
    "cluster_totals_only": ("true", True),
    "gateway": ("http://gateway.example:8000/", "http://gateway.example:8000"),
    "gateway_proxy_address": ("gateway://proxy:8786", "gateway://proxy:8786"),
    "gateway_auth": ("basic", "basic"),
    "gateway_user": ("monitor", "monitor"),
    "gateway_api_token_file": ("/secrets/token", "/secrets/token"),
    "gateway_list_interval": ("30s", 30.0),
    "remediate": ("trim,gc", ("gc", "trim")),
    "remediate_token_file": ("/etc/token", "/etc/token"),
    "remediate_interval": ("15m", 900.0),
    "remediate_dry_run": ("true", True),
}


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The developer's own DASK_MEMORY_EXPORTER_* or scheduler address must not leak in."""
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX) or name == "DASK_SCHEDULER_ADDRESS":
            monkeypatch.delenv(name)


def serve_settings(*argv: str) -> Settings:
    """Settings as ``serve`` builds them from its command line (and the environment)."""
    args = build_parser().parse_args(["serve", *argv])
    return load_settings({}, cli=args.settings_source(parsed_args=args))


def run_cli(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dask_memory_exporter", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "1000", **(env or {})},
    )


def test_defaults_and_dask_config() -> None:
    s = load_settings({"scheduler": SCHEDULER})
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
        s = load_settings({"scheduler": SCHEDULER})
    assert s.thresholds == {"spill": 0.7, "pause": 0.5, "terminate": 0.95}
    assert s.target is False
    assert s.recent_to_old_time == 5


def test_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", "tls://sched:8786")
    monkeypatch.setenv("DASK_MEMORY_EXPORTER_LISTEN", "127.0.0.1:9999")
    monkeypatch.setenv("DASK_MEMORY_EXPORTER_POLL_INTERVAL", "2s")
    s = load_settings({})
    assert (s.scheduler, s.listen_port, s.poll_interval) == ("tls://sched:8786", 9999, 2.0)
    assert serve_settings().scheduler == "tls://sched:8786"
    monkeypatch.setenv("DASK_MEMORY_EXPORTER_SCHEDULER", "tcp://other:1")
    assert load_settings({}).scheduler == "tcp://other:1"
    assert load_settings({"scheduler": "tcp://cli:2"}).scheduler == "tcp://cli:2"
    assert serve_settings("--scheduler", "tcp://cli:2").scheduler == "tcp://cli:2"


def test_precedence_cli_env_dask_config_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", SCHEDULER)
    assert serve_settings().pause == 0.8  # Dask's built-in default
    with dask.config.set({"distributed.worker.memory.pause": 0.5}):
        assert serve_settings().pause == 0.5
        monkeypatch.setenv("DASK_MEMORY_EXPORTER_PAUSE", "0.6")
        assert serve_settings().pause == 0.6
        assert serve_settings("--pause", "0.7").pause == 0.7


@pytest.mark.parametrize("how", ["cli", "environment", "dask config"])
@pytest.mark.parametrize("disabled", ["false", "off", "0"])
def test_a_disabled_threshold_has_no_series(
    monkeypatch: pytest.MonkeyPatch, how: str, disabled: str
) -> None:
    """False, "false", "off" (and 0, which Dask also treats as disabled) drop the threshold.

    ``thresholds`` is what the collector renders: a disabled one is absent, not 0.
    """
    argv = ["--scheduler", SCHEDULER]
    config: dict[str, Any] = {}
    if how == "cli":
        argv += ["--pause", disabled]
    elif how == "environment":
        monkeypatch.setenv("DASK_MEMORY_EXPORTER_PAUSE", disabled)
    else:
        config["distributed.worker.memory.pause"] = False if disabled != "0" else 0
    with dask.config.set(config):
        s = serve_settings(*argv)
    assert s.pause is False
    assert s.thresholds == {"target": 0.6, "spill": 0.7, "terminate": 0.95}


def test_dask_config_disabled_threshold_can_be_enabled() -> None:
    with dask.config.set({"distributed.worker.memory.spill": False}):
        assert "spill" not in serve_settings("--scheduler", SCHEDULER).thresholds
        enabled = serve_settings("--scheduler", SCHEDULER, "--spill", "0.75")
    assert enabled.thresholds["spill"] == 0.75


@pytest.mark.parametrize("name", sorted(Settings.model_fields))
def test_every_field_is_an_option_and_a_variable(
    monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    """Each field is set by ``--kebab-name`` and by DASK_MEMORY_EXPORTER_<NAME>, same result."""
    assert set(SAMPLES) == set(Settings.model_fields), "add a sample for each new field"
    raw, expected = SAMPLES[name]
    base = {} if name == "scheduler" else {"DASK_SCHEDULER_ADDRESS": SCHEDULER}
    if name == "gateway":  # which needs a readable credential file (any non-empty file)
        base = {ENV_PREFIX + "GATEWAY_API_TOKEN_FILE": __file__}
    if name == "remediate":  # which needs its token
        base[ENV_PREFIX + "REMEDIATE_TOKEN_FILE"] = "/etc/token"
    for var, value in base.items():
        monkeypatch.setenv(var, value)
    field = Settings.model_fields[name]
    option = "--" + name.replace("_", "-")
    if field.annotation is bool:  # a flag: --x or --no-x, whichever changes the default
        argv = [option if expected else option.replace("--", "--no-", 1)]
    else:
        argv = [option, raw]
    assert field.get_default(call_default_factory=True, validated_data={}) != expected
    assert getattr(serve_settings(*argv), name) == expected
    monkeypatch.setenv(ENV_PREFIX + name.upper(), raw)
    assert getattr(serve_settings(), name) == expected


def _help_lines(argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict[str, str]:
    """``--help`` of a subcommand: the help text of each option, by its first long name."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    text = capsys.readouterr().out.split("options:", 1)[1]
    helps: dict[str, str] = {}
    name = ""
    # An option starts a line indented by two; its help follows on that line or the next ones.
    for line in text.splitlines():
        if line.startswith("  -"):
            invocation, _, rest = line.strip().partition("  ")
            name = re.findall(r"--[\w-]+", invocation)[0]
            helps[name] = rest.strip()
        elif name and line.strip():
            helps[name] = f"{helps[name]} {line.strip()}".strip()
    return helps


def test_serve_help_shows_the_model_defaults(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("COLUMNS", "1000")
    config = {
        "distributed.worker.memory.pause": 0.55,
        "distributed.worker.memory.target": False,
        "distributed.worker.memory.recent-to-old-time": "12s",
    }
    with dask.config.set(config):
        helps = _help_lines(["serve", "--help"], capsys)
    assert "(default: 0.55)" in helps["--pause"]
    assert "(default: false)" in helps["--target"]
    assert "(default: 0.7)" in helps["--spill"]
    assert "(default: 12s)" in helps["--recent-to-old-time"]
    assert "(default: 10s)" in helps["--timeout"]
    assert "(default: 0.0.0.0:9787)" in helps["--listen"]
    assert "(default: scheduler)" in helps["--mode"]
    assert "(default: true)" in helps["--process-metrics"]
    for name, field in Settings.model_fields.items():
        option = "--" + name.replace("_", "-")
        assert field.description, f"{name} has no description"
        assert helps[option].startswith(field.description), option
        assert "(default: " in helps[option], option
        assert f"[env: {ENV_PREFIX}{name.upper()}]" in helps[option], option


def test_demo_and_generate_help_show_defaults(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("COLUMNS", "1000")
    helps = _help_lines(["demo", "--help"], capsys)
    assert "(default: 400MiB)" in helps["--memory-limit"]
    assert "(default: 127.0.0.1:9787)" in helps["--listen"]
    assert "(default: run until Ctrl-C)" in helps["--duration"]
    assert set(helps) == {"--help", *(f"--{o.name}" for o in DEMO_OPTIONS)}
    helps = _help_lines(["generate", "--help"], capsys)
    for generator in GENERATORS.values():
        assert str(generator.default_dir) in helps["--output-dir"]


def test_readme_options_table_lists_every_option(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The README's table is prose: it must name every ``serve`` option, and only those."""
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    table = readme.split("| option | environment | default | meaning |", 1)[1].split("\n\n")[0]
    documented = set(re.findall(r"`(--[\w-]+)`", table))
    monkeypatch.setenv("COLUMNS", "1000")
    options = set(_help_lines(["serve", "--help"], capsys)) - {"--help"}
    options |= {"--no-process-metrics", "--no-nvml"}
    assert documented == options


def test_demo_options_parse_to_their_defaults() -> None:
    args = build_parser().parse_args(["demo", "--log-level", "debug"])
    assert (args.listen, args.scenario, args.memory_limit) == ("127.0.0.1:9787", "all", "400MiB")
    assert (args.leak_rate, args.duration, args.log_level) == ("4MiB", None, "DEBUG")


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"scheduler": "tcp://host-without-port"}, "scheduler"),
        ({"scheduler": "nonsense://x:1"}, "scheduler"),
        ({"scheduler": "tcp://h:1", "listen": "9787"}, "listen"),
        ({"scheduler": "tcp://h:1", "listen": "h:99999"}, "listen"),
        ({"scheduler": "tcp://h:1", "spill": 1.5}, "--spill"),
        ({"scheduler": "tcp://h:1", "pause": True}, "--pause"),
        ({"scheduler": "tcp://h:1", "pause": "maybe"}, "--pause"),
        ({"scheduler": "tcp://h:1", "poll_interval": "soon"}, "poll-interval"),
        ({"scheduler": "tcp://h:1", "mode": "everything"}, "mode"),
        ({}, "DASK_SCHEDULER_ADDRESS"),
    ],
)
def test_bad_input_is_one_line(overrides: dict[str, object], fragment: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_settings(overrides)
    assert fragment in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("argv", "env"),
    [
        (["serve", "--scheduler", "tcp://nope"], {}),
        (["serve", "--scheduler", "tcp://h:1", "--listen", "x"], {}),
        (["serve", "--scheduler", "tcp://h:1", "--spill", "abc"], {}),
        (["serve", "--scheduler", "tcp://h:1", "--pause", "2"], {}),
        (["serve", "--scheduler", "tcp://h:1"], {"DASK_MEMORY_EXPORTER_PAUSE": "maybe"}),
        (["serve", "--scheduler", "tcp://h:1", "--mode", "all"], {}),
        (["serve", "--scheduler", "tcp://h:1"], {"DASK_DISTRIBUTED__WORKER__MEMORY__PAUSE": "abc"}),
        (["serve", "--bogus"], {}),
        (["demo", "--scenario", "boom"], {}),
        (["generate", "rules", "--set", "nope=1"], {}),
        (["generate", "rules", "--set", "paused_for=abc", "--output-dir", "/nonexistent"], {}),
    ],
)
def test_cli_exit_2_without_traceback(argv: list[str], env: dict[str, str]) -> None:
    proc = run_cli(*argv, env=env)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("dask-memory-exporter: error:")


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("dask-memory-exporter ")


def test_gateway_takes_the_place_of_the_scheduler(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    token = tmp_path / "token"
    token.write_text("abc\n")
    # DASK_SCHEDULER_ADDRESS (a Dask container's) does not apply to a gateway exporter.
    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", SCHEDULER)
    s = serve_settings(
        "--gateway", "https://gw.example/prefix/", "--gateway-api-token-file", str(token)
    )
    assert (s.gateway, s.scheduler, s.gateway_auth) == (
        "https://gw.example/prefix",
        None,
        "jupyterhub",
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--gateway", "gw.example:8000"], "--gateway: expected http(s)://HOST[:PORT][/PREFIX]"),
        (["--gateway", "http://:8000"], "--gateway: expected http(s)://HOST"),
        (["--gateway", "http://gw:port"], "--gateway: bad port"),
        (["--gateway", "http://gw"], "--gateway-api-token-file is required with --gateway"),
        (["--gateway", "http://gw", "--gateway-api-token-file", "/nonexistent/token"],
         "--gateway-api-token-file /nonexistent/token: cannot read: No such file or directory"),
        (["--gateway", "http://gw", "--gateway-api-token-file", "EMPTY"], "the file is empty"),
        (["--gateway", "http://gw", "--gateway-api-token-file", "TOKEN", "--scheduler", SCHEDULER],
         "--gateway and --scheduler exclude each other"),
        (["--gateway", "http://gw", "--gateway-api-token-file", "TOKEN", "--mode", "local"],
         "--gateway works only with --mode scheduler"),
        (["--gateway-proxy-address", "nowhere"], "--gateway-proxy-address: expected HOST:PORT"),
        (["--gateway", "http://gw", "--gateway-api-token-file", "TOKEN", "--remediate", "gc",
          "--remediate-token-file", "TOKEN"], "--remediate works with --scheduler only"),
        (["--gateway", "http://gw", "--gateway-api-token-file", "TOKEN", "--gateway-auth", "x"],
         "--gateway-auth"),
    ],
)  # fmt: skip
def test_bad_gateway_options_are_one_line_and_exit_2(
    argv: list[str], message: str, tmp_path: Path
) -> None:
    (tmp_path / "EMPTY").write_text("\n")
    (tmp_path / "TOKEN").write_text("abc")
    argv = [str(tmp_path / a) if a in ("EMPTY", "TOKEN") else a for a in argv]
    message = message.replace("TOKEN", str(tmp_path / "TOKEN"))
    proc = run_cli("serve", "--listen", "127.0.0.1:0", *argv)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert message in proc.stderr, proc.stderr
