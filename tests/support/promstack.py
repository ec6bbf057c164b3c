"""Test support: a real Prometheus and Alertmanager on loopback, in a temporary directory.

Both are the Debian binaries (``/usr/bin/prometheus`` 2.42, ``/usr/bin/prometheus-alertmanager``
0.25; ``./dev test`` installs them). Each runs on 127.0.0.1 with a free port, its own temporary
storage and log files, and is stopped (SIGTERM, then SIGKILL) and cleaned up when its context
manager exits. The API is synchronous (``urllib``), so it can be used from plain tests; from an
async test wrap calls in ``asyncio.to_thread`` so that an in-process webhook keeps running.

Typical use::

    with run_alertmanager(config_yaml) as am, run_prometheus(
        scrape_targets=["http://127.0.0.1:9787/metrics"],
        rule_texts=render_files(MixinConfig()),
        alertmanager_url=am.url,
    ) as prom:
        prom.wait_for("up == 1", timeout=30)
        value = prom.query_scalar("sum(dask_memory_worker_process_bytes)")

What it does not do: start the exporter or a Dask cluster (see ``tests/support/live.py`` and
the exporter's ``demo`` command), or check rules (call ``promtool`` with :func:`run_tool`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "Alertmanager",
    "PromStackError",
    "Prometheus",
    "Sample",
    "Series",
    "binary",
    "free_port",
    "run_alertmanager",
    "run_prometheus",
    "run_tool",
]

_INSTALL_HINT = (
    "install the Debian packages prometheus and prometheus-alertmanager "
    "(./dev test does it), or set PROMETHEUS_BIN / ALERTMANAGER_BIN / PROMTOOL_BIN / AMTOOL_BIN"
)
_DEFAULTS = {
    "prometheus": ("PROMETHEUS_BIN", "/usr/bin/prometheus"),
    "prometheus-alertmanager": ("ALERTMANAGER_BIN", "/usr/bin/prometheus-alertmanager"),
    "promtool": ("PROMTOOL_BIN", "/usr/bin/promtool"),
    "amtool": ("AMTOOL_BIN", "/usr/bin/amtool"),
}


class PromStackError(RuntimeError):
    """A binary is missing, failed to start, or an API call failed."""


def binary(name: str) -> str:
    """Path of ``prometheus``, ``prometheus-alertmanager``, ``promtool`` or ``amtool``."""
    env, default = _DEFAULTS[name]
    candidates = [os.environ.get(env), shutil.which(name), default]
    for c in candidates:
        if c and os.access(c, os.X_OK):
            return c
    raise PromStackError(f"{name} not found: {_INSTALL_HINT}")


def run_tool(
    name: str, *args: str | Path, cwd: str | Path | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run ``promtool`` or ``amtool`` and return the completed process (never raises on exit 1)."""
    return subprocess.run(
        [binary(name), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
        check=False,
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Sample:
    """One element of an instant vector (or a scalar, with empty labels)."""

    labels: dict[str, str]
    value: float


@dataclass(frozen=True)
class Series:
    """One element of a range vector: labels and (unix time, value) points."""

    labels: dict[str, str]
    points: list[tuple[float, float]] = field(default_factory=list)


def _http_json(
    url: str, params: Mapping[str, str] | None = None, method: str = "GET", timeout: float = 10
) -> Any:
    if params:
        url += "?" + urllib.parse.urlencode(params)
    req = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            body = r.read()
    except urllib.error.HTTPError as e:
        body = e.read()
        try:
            doc = json.loads(body)
        except ValueError:
            raise PromStackError(f"{method} {url}: HTTP {e.code}: {body[:500]!r}") from None
        raise PromStackError(f"{method} {url}: HTTP {e.code}: {doc.get('error', doc)}") from None
    return json.loads(body) if body else None


class _Process:
    """A server process with log files in its own directory; stopped by :meth:`stop`."""

    name = "server"

    def __init__(self, workdir: Path, url: str, proc: subprocess.Popen[bytes]) -> None:
        self.workdir = workdir
        self.url = url
        self.process = proc

    @property
    def log_path(self) -> Path:
        return self.workdir / "server.log"

    def log(self, tail: int = 40) -> str:
        """The last ``tail`` lines of the server's output."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-tail:])

    def get(self, path: str, params: Mapping[str, str] | None = None, timeout: float = 10) -> Any:
        return _http_json(self.url + path, params, timeout=timeout)

    def post(self, path: str, timeout: float = 10) -> Any:
        return _http_json(self.url + path, method="POST", timeout=timeout)

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/-/ready", timeout=2) as r:
                return int(r.status) == 200
        except (OSError, urllib.error.URLError):
            return False

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.is_ready():
            if self.process.poll() is not None:
                raise PromStackError(
                    f"{self.name} exited with {self.process.returncode}:\n{self.log()}"
                )
            if time.monotonic() > deadline:
                raise PromStackError(f"{self.name} not ready after {timeout}s:\n{self.log()}")
            time.sleep(0.05)

    def stop(self, grace: float = 10) -> None:
        """SIGTERM, wait up to ``grace`` seconds, then SIGKILL."""
        p = self.process
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
                p.wait(timeout=10)


class Prometheus(_Process):
    """A running Prometheus; ``.url`` is its base URL (``http://127.0.0.1:PORT``)."""

    name = "prometheus"

    def api(self, path: str, params: Mapping[str, str] | None = None) -> Any:
        """``data`` of a ``/api/v1/<path>`` response; raises PromStackError on an API error."""
        doc = self.get("/api/v1/" + path.lstrip("/"), params)
        if not isinstance(doc, dict) or doc.get("status") != "success":
            raise PromStackError(f"/api/v1/{path} {dict(params or {})}: {doc}")
        return doc["data"]

    def query_data(self, expr: str, at: float | None = None) -> dict[str, Any]:
        """Raw ``data`` ({resultType, result}) of an instant query."""
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        data: dict[str, Any] = self.api("query", params)
        return data

    def query(self, expr: str, at: float | None = None) -> list[Sample]:
        """Instant query; a scalar result is returned as one sample without labels."""
        data = self.query_data(expr, at)
        kind, result = data["resultType"], data["result"]
        if kind == "vector":
            return [Sample(dict(r["metric"]), float(r["value"][1])) for r in result]
        if kind == "scalar":
            return [Sample({}, float(result[1]))]
        raise PromStackError(f"query {expr!r}: unexpected result type {kind}")

    def query_scalar(self, expr: str, at: float | None = None) -> float | None:
        """The value of a query returning at most one sample (None when empty)."""
        samples = self.query(expr, at)
        if len(samples) > 1:
            raise PromStackError(f"query {expr!r} returned {len(samples)} samples")
        return samples[0].value if samples else None

    def query_range(
        self, expr: str, start: float, end: float, step: float | str = 1.0
    ) -> list[Series]:
        """Range query between unix times ``start`` and ``end``."""
        data = self.api(
            "query_range",
            {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": str(step)},
        )
        return [
            Series(dict(r["metric"]), [(float(t), float(v)) for t, v in r["values"]])
            for r in data["result"]
        ]

    def alerts(self) -> list[dict[str, Any]]:
        """Active alerts (pending and firing) as Prometheus reports them."""
        alerts: list[dict[str, Any]] = self.api("alerts")["alerts"]
        return alerts

    def firing(self, alertname: str | None = None) -> list[dict[str, Any]]:
        return [
            a
            for a in self.alerts()
            if a["state"] == "firing" and alertname in (None, a["labels"].get("alertname"))
        ]

    def rules(self) -> list[dict[str, Any]]:
        """Loaded rule groups (with health and last error of each rule)."""
        groups: list[dict[str, Any]] = self.api("rules")["groups"]
        return groups

    def rule_errors(self) -> list[str]:
        """``"rule: error"`` for every rule whose last evaluation failed."""
        return [
            f"{r['name']}: {r['lastError']}"
            for g in self.rules()
            for r in g["rules"]
            if r.get("health") == "err"
        ]

    def targets(self) -> list[dict[str, Any]]:
        targets: list[dict[str, Any]] = self.api("targets")["activeTargets"]
        return targets

    def wait_for(
        self,
        expr: str,
        timeout: float = 30,
        predicate: Callable[[list[Sample]], bool] = bool,
        interval: float = 0.25,
    ) -> list[Sample]:
        """Poll ``expr`` until ``predicate(result)`` (default: non-empty); return the result."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(expr)
            if predicate(result):
                return result
            if self.process.poll() is not None:
                raise PromStackError(f"prometheus exited:\n{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out after {timeout}s waiting for {expr!r}; last result {result}"
                )
            time.sleep(interval)

    def wait_for_targets(self, timeout: float = 30) -> None:
        """Wait until every scrape target has been scraped successfully (``up == 1``)."""
        n = len(self.targets())
        self.wait_for("up == 1", timeout, lambda r: len(r) >= n)

    def reload(self) -> None:
        """Re-read the configuration and rule files (``--web.enable-lifecycle`` is on)."""
        self.post("/-/reload")


class Alertmanager(_Process):
    """A running Alertmanager; ``.url`` is its base URL."""

    name = "alertmanager"

    def alerts(self, active_only: bool = True) -> list[dict[str, Any]]:
        params = {"active": "true"} if active_only else None
        alerts: list[dict[str, Any]] = self.get("/api/v2/alerts", params)
        return alerts

    def status(self) -> dict[str, Any]:
        status: dict[str, Any] = self.get("/api/v2/status")
        return status


def _start(
    kind: type[_Process],
    argv_for: Callable[[Path, int], list[str]],
    workdir: Path,
    startup_timeout: float,
    attempts: int = 3,
) -> _Process:
    """Start on a free port; retry on another port if the server dies early (port race)."""
    last = ""
    for _ in range(attempts):
        port = free_port()
        log = (workdir / "server.log").open("ab")
        try:
            proc = subprocess.Popen(
                argv_for(workdir, port),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=workdir,
            )
        finally:
            log.close()
        server = kind(workdir, f"http://127.0.0.1:{port}", proc)
        try:
            server.wait_ready(startup_timeout)
            return server
        except PromStackError as e:
            last = str(e)
            server.stop(grace=2)
            if "address already in use" not in server.log().lower():
                break
    raise PromStackError(last)


def _target_of(target: str) -> tuple[str, str, str]:
    """(scheme, host:port, metrics path) of ``host:port`` or ``http://host:port/path``."""
    if "://" not in target:
        return "http", target, "/metrics"
    u = urllib.parse.urlsplit(target)
    return u.scheme, u.netloc, u.path or "/metrics"


def prometheus_config(
    scrape_targets: Sequence[str],
    rule_files: Sequence[str],
    scrape_interval: str,
    evaluation_interval: str,
    alertmanager_url: str | None,
    job: str,
    target_labels: Mapping[str, str] | None = None,
    extra_scrape_configs: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """The prometheus.yml for :func:`run_prometheus` (one job, targets grouped by path)."""
    by_path: dict[tuple[str, str], list[str]] = {}
    for t in scrape_targets:
        scheme, netloc, path = _target_of(t)
        by_path.setdefault((scheme, path), []).append(netloc)
    scrape_configs = []
    for i, ((scheme, path), netlocs) in enumerate(by_path.items()):
        static: dict[str, Any] = {"targets": netlocs}
        if target_labels:
            static["labels"] = dict(target_labels)
        scrape_configs.append(
            {
                "job_name": job if i == 0 else f"{job}-{i}",
                "scheme": scheme,
                "metrics_path": path,
                "scrape_interval": scrape_interval,
                "scrape_timeout": scrape_interval,
                "static_configs": [static],
            }
        )
    config: dict[str, Any] = {
        "global": {
            "scrape_interval": scrape_interval,
            "evaluation_interval": evaluation_interval,
        },
        "rule_files": list(rule_files),
        "scrape_configs": [*scrape_configs, *map(dict, extra_scrape_configs)],
    }
    if alertmanager_url:
        scheme, netloc, path = _target_of(alertmanager_url)
        am: dict[str, Any] = {"scheme": scheme, "static_configs": [{"targets": [netloc]}]}
        if path not in ("", "/", "/metrics"):
            am["path_prefix"] = path
        config["alerting"] = {"alertmanagers": [am]}
    return config


@contextlib.contextmanager
def run_prometheus(
    scrape_targets: Sequence[str] = (),
    rule_files: Iterable[str | Path] = (),
    rule_texts: Mapping[str, str] | None = None,
    scrape_interval: str = "1s",
    evaluation_interval: str = "1s",
    alertmanager_url: str | None = None,
    job: str = "dask-memory-exporter",
    target_labels: Mapping[str, str] | None = None,
    extra_args: Sequence[str] = (),
    startup_timeout: float = 30,
    extra_scrape_configs: Sequence[Mapping[str, Any]] = (),
) -> Iterator[Prometheus]:
    """Run Prometheus on 127.0.0.1:<free port>; stop it and delete its data on exit.

    ``scrape_targets`` are ``host:port`` or full URLs (``http://127.0.0.1:9787/metrics``),
    scraped under job ``job`` (the default matches ``MixinConfig().exporter_selector``).
    ``rule_files`` are paths; ``rule_texts`` maps file names to rule-file text (for instance
    ``exporter.rules.render_files(config)``; non-rule files such as a PrometheusRule manifest
    are skipped). ``alertmanager_url`` is the Alertmanager's base URL.
    ``extra_scrape_configs`` are appended as written (e.g. jobs with ``tls_config`` and
    ``basic_auth``).
    """
    with tempfile.TemporaryDirectory(prefix="promstack-prometheus-") as tmp:
        workdir = Path(tmp)
        files = [str(Path(p).resolve()) for p in rule_files]
        for name, text in (rule_texts or {}).items():
            doc = yaml.safe_load(text)
            if not isinstance(doc, dict) or "groups" not in doc:
                continue  # e.g. a PrometheusRule custom resource
            path = workdir / "rules" / name
            path.parent.mkdir(exist_ok=True)
            path.write_text(text)
            files.append(str(path))
        config = prometheus_config(
            scrape_targets,
            files,
            scrape_interval,
            evaluation_interval,
            alertmanager_url,
            job,
            target_labels,
            extra_scrape_configs,
        )
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))

        def argv(wd: Path, port: int) -> list[str]:
            return [
                binary("prometheus"),
                f"--config.file={wd / 'prometheus.yml'}",
                f"--storage.tsdb.path={wd / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--web.enable-lifecycle",
                "--log.level=info",
                *extra_args,
            ]

        server = _start(Prometheus, argv, workdir, startup_timeout)
        assert isinstance(server, Prometheus)
        try:
            yield server
        finally:
            server.stop()


@contextlib.contextmanager
def run_alertmanager(config_yaml: str, startup_timeout: float = 30) -> Iterator[Alertmanager]:
    """Run Alertmanager (no clustering) on 127.0.0.1:<free port> with the given config."""
    with tempfile.TemporaryDirectory(prefix="promstack-alertmanager-") as tmp:
        workdir = Path(tmp)
        (workdir / "alertmanager.yml").write_text(config_yaml)

        def argv(wd: Path, port: int) -> list[str]:
            return [
                binary("prometheus-alertmanager"),
                f"--config.file={wd / 'alertmanager.yml'}",
                f"--storage.path={wd / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--cluster.listen-address=",
                "--log.level=info",
            ]

        server = _start(Alertmanager, argv, workdir, startup_timeout)
        assert isinstance(server, Alertmanager)
        try:
            yield server
        finally:
            server.stop()
