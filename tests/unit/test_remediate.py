"""Remediation's parsing and guards, and its webhook served by aiohttp in-process.

The worker side is replaced here by a recording runner (``Recorder``): these tests are about
what reaches a worker and when, and "nothing runs" is then a fact to assert rather than an
absence to infer. tests/e2e/test_remediation_live.py runs the real thing (a LocalCluster,
Prometheus, Alertmanager and the exporter's command).
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient

from dask_memory_exporter import remediate as r
from dask_memory_exporter.collector import Exposition
from dask_memory_exporter.config import ConfigError, Settings, load_settings
from dask_memory_exporter.memory import MemoryBreakdown, WorkerReading
from dask_memory_exporter.snapshot import Snapshot, WorkerSnapshot
from dask_memory_exporter.source import WorkerInfo
from tests.support.live import parse
from tests.support.promstack import run_tool
from tests.support.remediation import REMEDIATION_CONFIG, merged_config

TOKEN = "0123456789abcdef-test-token"
MiB = 2**20
AClient = Callable[[web.Application], Awaitable[TestClient[Any, Any]]]


def worker(name: str, address: str) -> WorkerSnapshot:
    reading = WorkerReading(
        process=500 * MiB, managed_total=0, spilled_memory=0, spilled_disk=0, heartbeat_time=1.0
    )
    info = WorkerInfo(
        address=address,
        name=name,
        host="10.0.0.1",
        nthreads=1,
        memory_limit=600 * MiB,
        status="running",
        last_seen=1.0,
        nanny=None,
        reading=reading,
    )
    mem = MemoryBreakdown(process=500 * MiB, managed=0, unmanaged_old=500 * MiB, spilled=0)
    return WorkerSnapshot(info=info, memory=mem)


SNAPSHOT = Snapshot(
    time=2.0,
    workers=(
        worker("trim", "tcp://10.0.0.1:4001"),
        worker("other", "tcp://10.0.0.2:4002"),
        worker("twin", "tcp://10.0.0.3:4003"),
        worker("twin", "tcp://10.0.0.4:4004"),
    ),
)


def alert(
    name: str | None = "trim",
    address: str | None = "tcp://10.0.0.1:4001",
    *,
    alertname: str = r.ALERT,
    status: str = "firing",
) -> dict[str, Any]:
    labels = {"alertname": alertname, "severity": "warning", "job": "dask-memory-exporter"}
    if name is not None:
        labels["worker_name"] = name
    if address is not None:
        labels["worker"] = address
    return {"status": status, "labels": labels, "annotations": {}, "startsAt": "x"}


def notification(*alerts: dict[str, Any]) -> dict[str, Any]:
    return {
        "version": "4",
        "status": "firing",
        "receiver": "dask-remediate",
        "groupLabels": {},
        "commonLabels": {},
        "alerts": list(alerts),
    }


# --- parsing ----------------------------------------------------------------------------------


def test_only_firing_remediation_alerts_become_targets() -> None:
    body = notification(
        alert(),
        alert("other", None),
        alert(alertname="DaskWorkerPaused"),
        alert(status="resolved"),
    )
    targets, ignored = r.parse_notification(json.dumps(body).encode())
    assert targets == [
        r.AlertTarget("tcp://10.0.0.1:4001", "trim"),
        r.AlertTarget(None, "other"),
    ]
    assert ignored == 2


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "invalid JSON"),
        (b"\xff\xfe", "invalid JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "invalid JSON"),  # RecursionError inside json
        (b"[]", "expected a JSON object"),
        (b'{"version": "5", "alerts": []}', "unsupported notification version"),
        (b'{"alerts": {}}', '"alerts", a list'),
        (b'{"alerts": [1]}', "alerts[0]: expected an object"),
        (b'{"alerts": [{"status": "firing", "labels": {"a": 1}}]}', "alerts[0].labels"),
        (b'{"alerts": [{"status": 3, "labels": {}}]}', "alerts[0].status"),
    ],
)
def test_what_is_not_a_notification_is_a_payload_error(body: bytes, message: str) -> None:
    with pytest.raises(r.PayloadError, match=message.replace("[", r"\[").replace("]", r"\]")):
        r.parse_notification(body)


@pytest.mark.parametrize(
    ("header", "ok"),
    [
        (f"Bearer {TOKEN}", True),
        (f"bearer {TOKEN}", True),
        (f"Bearer  {TOKEN} ", True),
        (f"Bearer {TOKEN}x", False),
        (f"Bearer {TOKEN[:-1]}", False),
        (f"Basic {TOKEN}", False),
        (TOKEN, False),
        ("Bearer", False),
        ("", False),
        (None, False),
    ],
)
def test_bearer_token(header: str | None, ok: bool) -> None:
    assert r.bearer_matches(header, TOKEN) is ok


def test_no_token_configured_matches_nothing() -> None:
    assert not r.bearer_matches("Bearer ", "")
    assert not r.bearer_matches("Bearer x", None)


# --- the token file ---------------------------------------------------------------------------


def test_token_file_is_read_stripped_and_reread_when_rotated(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    tokens = r.TokenFile(str(path))
    assert tokens.token == TOKEN
    rotated = tmp_path / "rotated"
    rotated.write_text("another-token-of-enough-length")
    os.replace(rotated, path)  # what a Kubernetes Secret update does (a new inode)
    assert tokens.token == "another-token-of-enough-length"


def test_token_file_fails_closed_when_it_becomes_unusable(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text(TOKEN)
    tokens = r.TokenFile(str(path))
    path.unlink()
    assert tokens.token is None
    path.write_text("short")
    assert tokens.token is None
    path.write_text(TOKEN)
    assert tokens.token == TOKEN


@pytest.mark.parametrize("content", [None, "", "short", "has a space in it, long enough"])
def test_unusable_token_file_at_start_is_a_config_error(
    tmp_path: Path, content: str | None
) -> None:
    path = tmp_path / "token"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match="--remediate-token-file"):
        r.TokenFile(str(path))


# --- settings ---------------------------------------------------------------------------------


def test_settings_parse_actions_in_playbook_order(monkeypatch: pytest.MonkeyPatch) -> None:
    s = load_settings(
        {"scheduler": "tcp://h:1", "remediate": "trim, gc,trim", "remediate_token_file": "t"}
    )
    assert s.remediate == ("gc", "trim")
    assert s.remediate_interval == 600 and s.remediate_dry_run is False
    assert load_settings({"scheduler": "tcp://h:1"}).remediate == ()
    monkeypatch.setenv("DASK_MEMORY_EXPORTER_REMEDIATE", "gc")  # not JSON: NoDecode
    monkeypatch.setenv("DASK_MEMORY_EXPORTER_REMEDIATE_TOKEN_FILE", "t")
    monkeypatch.setenv("DASK_MEMORY_EXPORTER_REMEDIATE_INTERVAL", "2m")
    s = load_settings({"scheduler": "tcp://h:1"})
    assert (s.remediate, s.remediate_interval) == (("gc",), 120)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"scheduler": "tcp://h:1", "remediate": "gc"}, "--remediate needs --remediate-token-file"),
        (
            {"mode": "local", "remediate": "gc", "remediate_token_file": "t"},
            "--remediate needs a scheduler",
        ),
        ({"scheduler": "tcp://h:1", "remediate": "gc,restart"}, "unknown action 'restart'"),
        ({"scheduler": "tcp://h:1", "remediate_interval": "0"}, "remediate-interval"),
    ],
)
def test_bad_remediation_settings_are_one_line(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as e:
        load_settings(overrides, {})
    assert "\n" not in str(e.value)


# --- guards -----------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_interval_guard_grants_once_per_interval_per_name() -> None:
    clock = Clock()
    guard = r.IntervalGuard(600, clock)
    assert guard.claim("a") is None
    assert guard.claim("b") is None
    clock.now += 599
    assert guard.claim("a") == 599
    clock.now += 1
    assert guard.claim("a") is None  # the interval is over
    assert guard.claim("b") is None


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (r.AlertTarget("tcp://10.0.0.1:4001", "trim"), "tcp://10.0.0.1:4001"),
        (r.AlertTarget("tcp://10.0.0.1:4001", None), "tcp://10.0.0.1:4001"),
        (r.AlertTarget(None, "trim"), "tcp://10.0.0.1:4001"),
        (r.AlertTarget("tcp://10.0.0.1:4001", "other"), "is now named 'trim'"),
        (r.AlertTarget("tcp://10.0.0.9:4009", "trim"), "no worker at tcp://10.0.0.9:4009"),
        (r.AlertTarget(None, "twin"), "2 workers named 'twin'"),
        (r.AlertTarget(None, "gone"), "0 workers named 'gone'"),
        (r.AlertTarget(None, None), "neither"),
    ],
)
def test_resolve_picks_a_current_worker_or_says_why_not(
    target: r.AlertTarget, expected: str
) -> None:
    found = r.resolve(target, SNAPSHOT)
    if isinstance(found, str):
        assert expected in found
    else:
        assert found.address == expected


# --- the webhook ------------------------------------------------------------------------------


class Recorder:
    """Stands in for the Dask client: records (address, action) and answers like the actions."""

    def __init__(self, *, fail_connect: bool = False, trim_available: bool = True) -> None:
        self.calls: list[tuple[str, str]] = []
        self.connects = 0
        self.fail_connect = fail_connect
        self.trim_available = trim_available

    @contextlib.asynccontextmanager
    async def connect(self) -> AsyncIterator[r.RunAction]:
        self.connects += 1
        if self.fail_connect:
            raise OSError("Timed out trying to connect to tcp://10.0.0.100:8786")

        async def run(address: str, action: str) -> Mapping[str, Any]:
            self.calls.append((address, action))
            if action == "gc":
                return {"rss_before": 500 * MiB, "rss_after": 490 * MiB, "collected": 7}
            if not self.trim_available:
                return {"available": False, "reason": "not available: the C library is musl"}
            return {"available": True, "rss_before": 490 * MiB, "rss_after": 140 * MiB}

        yield run


def settings(tmp_path: Path, **overrides: Any) -> Settings:
    token = tmp_path / "token"
    token.write_text(TOKEN)
    values = {
        "scheduler": "tcp://127.0.0.1:1",
        "remediate": "gc,trim",
        "remediate_token_file": str(token),
    }
    return load_settings(values | overrides, {})


async def webhook_client(
    aiohttp_client: AClient, s: Settings, recorder: Recorder, clock: Clock | None = None
) -> tuple[TestClient[Any, Any], r.Remediator]:
    rem = r.Remediator(s, lambda: SNAPSHOT, connect=recorder.connect, clock=clock or Clock())
    app = web.Application()
    r.install(app, rem)
    return await aiohttp_client(app), rem


def auth(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def counters(rem: r.Remediator) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = Exposition.render(Snapshot(time=0.0), process_metrics=False, collectors=[rem.stats])
    return {k: v for k, v in parse(text.text.decode()).items() if "remediation" in k[0]}


def remediations(rem: r.Remediator, action: str, result: str) -> float:
    key = ("dask_memory_remediations_total", (("action", action), ("result", result)))
    return counters(rem)[key]


def requests(rem: r.Remediator, code: int) -> float:
    key = ("dask_memory_remediation_webhook_requests_total", (("code", str(code)),))
    return counters(rem)[key]


async def test_the_alerted_worker_gets_gc_then_trim_and_a_second_alert_is_refused(
    aiohttp_client: AClient, tmp_path: Path
) -> None:
    rec, clock = Recorder(), Clock()
    client, rem = await webhook_client(aiohttp_client, settings(tmp_path), rec, clock)
    body = notification(alert(), alert(alertname="DaskWorkerPaused", name="other"))
    resp = await client.post(r.WEBHOOK_PATH, json=body, headers=auth())
    assert resp.status == 200
    answer = await resp.json()
    assert rec.calls == [("tcp://10.0.0.1:4001", "gc"), ("tcp://10.0.0.1:4001", "trim")]
    assert [(x["action"], x["result"]) for x in answer["results"]] == [
        ("gc", "success"),
        ("trim", "success"),
    ]
    assert answer["ignored_alerts"] == 1
    assert remediations(rem, "gc", "success") == remediations(rem, "trim", "success") == 1
    reclaimed = counters(rem)
    assert reclaimed[("dask_memory_remediation_reclaimed_bytes_total", (("action", "trim"),))] == (
        350 * MiB
    )
    assert reclaimed[("dask_memory_remediation_reclaimed_bytes_total", (("action", "gc"),))] == (
        10 * MiB
    )

    clock.now += 60
    resp = await client.post(r.WEBHOOK_PATH, json=notification(alert()), headers=auth())
    assert resp.status == 200
    assert [x["result"] for x in (await resp.json())["results"]] == ["refused", "refused"]
    assert len(rec.calls) == 2  # nothing more ran
    assert remediations(rem, "gc", "refused") == remediations(rem, "trim", "refused") == 1

    # The same worker by name only (the address label dropped) is still the same worker.
    resp = await client.post(r.WEBHOOK_PATH, json=notification(alert(address=None)), headers=auth())
    assert [x["result"] for x in (await resp.json())["results"]] == ["refused", "refused"]

    clock.now += 600
    resp = await client.post(r.WEBHOOK_PATH, json=notification(alert()), headers=auth())
    assert [x["result"] for x in (await resp.json())["results"]] == ["success", "success"]
    assert len(rec.calls) == 4
    assert requests(rem, 200) == 4


@pytest.mark.parametrize(
    "headers",
    [{}, auth("a-wrong-token-that-is-long-enough"), auth(TOKEN + "x"), {"Authorization": TOKEN}],
)
async def test_without_the_token_401_and_nothing_runs(
    aiohttp_client: AClient, tmp_path: Path, headers: dict[str, str]
) -> None:
    rec = Recorder()
    client, rem = await webhook_client(aiohttp_client, settings(tmp_path), rec)
    resp = await client.post(r.WEBHOOK_PATH, json=notification(alert()), headers=headers)
    assert resp.status == 401
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    assert (rec.calls, rec.connects) == ([], 0)
    assert requests(rem, 401) == 1
    assert all(v == 0 for k, v in counters(rem).items() if k[0] == "dask_memory_remediations_total")
    # ... and the worker was not claimed: with the token it is acted on at once.
    resp = await client.post(r.WEBHOOK_PATH, json=notification(alert()), headers=auth())
    assert [x["result"] for x in (await resp.json())["results"]] == ["success", "success"]


async def test_hostile_requests_get_4xx_and_nothing_runs(
    aiohttp_client: AClient, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rec = Recorder()
    client, rem = await webhook_client(aiohttp_client, settings(tmp_path), rec)
    post = client.post
    path = r.WEBHOOK_PATH
    valid = json.dumps(notification(alert())).encode()
    json_type = {"Content-Type": "application/json"}
    cases = [
        (post(path, data=valid, headers=auth() | {"Content-Type": "text/plain"}), 415),
        (post(path, data=valid, headers=auth()), 415),  # application/octet-stream
        (post(path, data=b"{nope", headers=auth() | json_type), 400),
        (post(path, data=b"[" * 200_000, headers=auth() | json_type), 400),
        (post(path, data=b'{"alerts": 7}', headers=auth() | json_type), 400),
        (post(path, data=b" " * (r.MAX_BODY + 1), headers=auth() | json_type), 413),
    ]

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted while read
        for _ in range(r.MAX_BODY // 65536 + 2):
            yield b" " * 65536

    cases.append((post(path, data=chunks(), headers=auth() | json_type), 413))
    # A gzip bomb: 64 KiB on the wire, 64 MiB once aiohttp decompressed it.
    bomb = gzip.compress(b" " * (64 * MiB))
    cases.append(
        (post(path, data=bomb, headers=auth() | json_type | {"Content-Encoding": "gzip"}), 413)
    )
    for request, code in cases:
        resp = await request
        assert resp.status == code, await resp.text()
        assert (await resp.json())["status"] == "error"
    assert (rec.calls, rec.connects) == ([], 0)
    assert requests(rem, 415) == 2 and requests(rem, 400) == 3 and requests(rem, 413) == 3
    assert "Traceback" not in caplog.text
    resp = await client.get(path)
    assert resp.status == 405


async def test_dry_run_counts_and_logs_and_runs_nothing(
    aiohttp_client: AClient, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rec = Recorder()
    s = settings(tmp_path, remediate_dry_run=True)
    client, rem = await webhook_client(aiohttp_client, s, rec)
    with caplog.at_level("INFO", logger="dask_memory_exporter.remediate"):
        resp = await client.post(r.WEBHOOK_PATH, json=notification(alert()), headers=auth())
        answer = await resp.json()
        assert answer["dry_run"] is True
        assert [x["result"] for x in answer["results"]] == ["dry_run", "dry_run"]
        resp = await client.post(r.WEBHOOK_PATH, json=notification(alert()), headers=auth())
        assert [x["result"] for x in (await resp.json())["results"]] == ["refused", "refused"]
    assert (rec.calls, rec.connects) == ([], 0)
    assert remediations(rem, "gc", "dry_run") == 1
    assert "(dry run): would run gc on worker trim (tcp://10.0.0.1:4001)" in caplog.text


async def test_unknown_workers_failures_and_unavailable_trim_are_counted(
    aiohttp_client: AClient, tmp_path: Path
) -> None:
    rec = Recorder(trim_available=False)
    client, rem = await webhook_client(aiohttp_client, settings(tmp_path), rec)
    body = notification(alert(), alert("twin", None), alert("gone", "tcp://10.0.0.9:1"))
    resp = await client.post(r.WEBHOOK_PATH, json=body, headers=auth())
    results = {(x["worker_name"], x["action"]): x["result"] for x in (await resp.json())["results"]}
    assert results == {
        ("trim", "gc"): "success",
        ("trim", "trim"): "unavailable",
        ("twin", "gc"): "unknown_worker",
        ("twin", "trim"): "unknown_worker",
        ("gone", "gc"): "unknown_worker",
        ("gone", "trim"): "unknown_worker",
    }
    assert remediations(rem, "trim", "unavailable") == 1
    assert remediations(rem, "gc", "unknown_worker") == 2

    down = Recorder(fail_connect=True)
    client, rem = await webhook_client(aiohttp_client, settings(tmp_path), down)
    resp = await client.post(r.WEBHOOK_PATH, json=notification(alert()), headers=auth())
    assert resp.status == 200  # Alertmanager must not retry: the claim stands
    [gc, trim] = (await resp.json())["results"]
    assert gc["result"] == trim["result"] == "failed"
    assert "cannot connect to the scheduler" in gc["detail"]
    assert remediations(rem, "gc", "failed") == 1


async def test_the_app_serves_the_counters_and_without_remediate_has_no_webhook(
    aiohttp_client: AClient, tmp_path: Path
) -> None:
    """make_app with --remediate: the counters are in /metrics from the start, at 0; without
    --remediate there is no webhook at all."""
    from dask_memory_exporter.app import make_app

    client = await aiohttp_client(make_app(settings(tmp_path)))
    text = await (await client.get("/metrics")).text()
    assert 'dask_memory_remediations_total{action="trim",result="refused"} 0.0' in text
    assert 'dask_memory_remediation_webhook_requests_total{code="401"} 0.0' in text
    resp = await client.post(r.WEBHOOK_PATH, json=notification(alert()))
    assert resp.status == 401

    off = load_settings({"scheduler": "tcp://127.0.0.1:1"}, {})
    client = await aiohttp_client(make_app(off))
    assert (await client.post(r.WEBHOOK_PATH, json=notification(alert()))).status == 404
    assert "dask_memory_remediations_total" not in await (await client.get("/metrics")).text()


# --- the example Alertmanager configuration ---------------------------------------------------


def _amtool_ok(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, result.stdout + result.stderr


def test_example_remediation_config_passes_amtool() -> None:
    _amtool_ok(run_tool("amtool", "check-config", REMEDIATION_CONFIG))


@pytest.mark.parametrize(
    ("labels", "receivers"),
    [
        (
            ["alertname=DaskWorkerMemoryHighNoDataToSpill", "severity=warning"],
            "dask-remediate,dask-chat",
        ),
        (["alertname=DaskWorkerPaused", "severity=warning"], "dask-chat"),
        (["alertname=DaskWorkerNearTermination", "severity=critical"], "dask-pager"),
    ],
)
def test_merged_into_the_example_config_remediation_comes_first_and_continues(
    tmp_path: Path, labels: list[str], receivers: str
) -> None:
    """Merged as remediation.yaml says: still valid, and the alert still reaches chat."""
    path = tmp_path / "alertmanager.yml"
    path.write_text(yaml.safe_dump(merged_config(), sort_keys=False))
    _amtool_ok(run_tool("amtool", "check-config", path))
    result = run_tool(
        "amtool", "config", "routes", "test", f"--config.file={path}",
        f"--verify.receivers={receivers}", *labels,
    )  # fmt: skip
    _amtool_ok(result)


def test_example_receiver_sends_the_bearer_token_to_the_webhook_path() -> None:
    config = yaml.safe_load(REMEDIATION_CONFIG.read_text())
    [receiver] = [x for x in config["receivers"] if x["name"] == "dask-remediate"]
    [hook] = receiver["webhook_configs"]
    assert hook["url"].endswith(r.WEBHOOK_PATH)
    assert hook["http_config"]["authorization"]["type"] == "Bearer"
    assert "credentials_file" in hook["http_config"]["authorization"]
    [route] = config["route"]["routes"]
    assert route["matchers"] == [f'alertname="{r.ALERT}"'] and route["continue"] is True


async def test_basic_auth_of_the_web_config_leaves_the_webhook_to_its_token(
    aiohttp_client: AClient, tmp_path: Path
) -> None:
    """Alertmanager sends one Authorization header: the webhook takes the bearer token, and
    everything else still needs basic auth."""
    import bcrypt

    from dask_memory_exporter.app import make_app
    from dask_memory_exporter.webconfig import WEB_CONFIG, WebConfigWatcher, load_web_config

    web_config = tmp_path / "web.yml"
    hashed = bcrypt.hashpw(b"secret", bcrypt.gensalt(rounds=4)).decode()
    web_config.write_text(yaml.safe_dump({"basic_auth_users": {"alice": hashed}}))
    app = make_app(settings(tmp_path))
    app[WEB_CONFIG] = WebConfigWatcher(load_web_config(web_config))
    client = await aiohttp_client(app)
    assert (await client.get("/metrics")).status == 401
    resp = await client.post(r.WEBHOOK_PATH, json=notification(alert()))
    assert resp.status == 401
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    resp = await client.post(r.WEBHOOK_PATH, json=notification(alert()), headers=auth())
    assert resp.status == 200  # the worker is not in this app's (empty) Snapshot: nothing runs
    assert [x["result"] for x in (await resp.json())["results"]] == ["unknown_worker"] * 2
