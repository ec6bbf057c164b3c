"""Settings: the only module that reads the environment and Dask's configuration.

Every option has an environment twin ``DASK_MEMORY_EXPORTER_<NAME>``; command-line values win
over the environment, which wins over Dask's configuration (``distributed.worker.memory.*``)
and the built-in defaults. Units are parsed once here, with Dask's own parsers, so the rest of
the code deals in plain seconds and fractions.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal, get_args, get_origin
from urllib.parse import urlsplit

import dask.config
from dask.utils import parse_timedelta
from distributed.comm.addressing import parse_address
from distributed.comm.registry import backends
from distributed.security import Security
from pydantic import (
    BeforeValidator,
    Field,
    PlainValidator,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    CliSettingsSource,
    NoDecode,
    SettingsConfigDict,
    SettingsError,
)

__all__ = [
    "LOG_LEVELS",
    "REMEDIATION_ACTIONS",
    "THRESHOLDS",
    "ConfigError",
    "Settings",
    "add_settings_options",
    "load_settings",
    "parse_listen",
    "read_secret_file",
    "shown_default",
]

ENV_PREFIX = "DASK_MEMORY_EXPORTER_"
Mode = Literal["scheduler", "local", "both"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]
GatewayAuth = Literal["jupyterhub", "basic"]
LOG_LEVELS: tuple[str, ...] = get_args(LogLevel)
THRESHOLDS = ("target", "spill", "pause", "terminate")
"""The memory manager's thresholds, named as in ``distributed.worker.memory.<name>``."""

_DISABLED = ("false", "off", "no")
RemediationAction = Literal["gc", "trim"]
REMEDIATION_ACTIONS: tuple[str, ...] = get_args(RemediationAction)
"""What ``--remediate`` may run on a worker, in the order it runs them (``remediate.py``)."""


class ConfigError(ValueError):
    """An invalid option: reported as one line, exit status 2."""


@dataclass(frozen=True)
class Metavar:
    """How a field's value is written in ``--help``; pydantic ignores this annotation."""

    text: str


def parse_listen(value: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[v6]:PORT`` for IPv6); port 0 means any free port."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


def _seconds(v: object) -> object:
    """Accept Dask-style durations such as ``30s`` or ``500ms`` as well as numbers."""
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            pass
        try:
            return parse_timedelta(v)
        except (ValueError, KeyError):
            raise ValueError(f"invalid duration {v!r}") from None
    return v


def _threshold(v: object) -> float | Literal[False]:
    """A fraction of the memory limit, or ``False``: the feature is disabled, as in Dask.

    ``0`` is accepted and also means disabled, because Dask tests thresholds for truth
    (``if self.memory_pause_fraction and ...``): a worker configured with 0 never pauses.
    """
    if v is False or v is None or (isinstance(v, str) and v.strip().lower() in _DISABLED):
        return False
    if isinstance(v, bool):  # True has no meaning for a threshold
        raise ValueError("expected a fraction between 0 and 1, or false")
    try:
        ratio = float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"expected a fraction between 0 and 1, or false; got {v!r}") from None
    if not 0 <= ratio <= 1:
        raise ValueError(f"expected a fraction between 0 and 1, or false; got {v!r}")
    return ratio if ratio > 0 else False


def _actions(v: object) -> object:
    """``gc,trim`` (the command line and the environment) as a tuple, duplicates dropped,
    always in the playbook's order: gc first, then trim, which returns what gc freed."""
    if isinstance(v, str):
        v = [x.strip() for x in v.split(",") if x.strip()]
    if isinstance(v, (list, tuple)):
        unknown = [x for x in v if x not in REMEDIATION_ACTIONS]
        if unknown:
            known = ", ".join(REMEDIATION_ACTIONS)
            raise ValueError(f"unknown action {unknown[0]!r} (known: {known})")
        return tuple(a for a in REMEDIATION_ACTIONS if a in v)
    return v


Duration = Annotated[float, BeforeValidator(_seconds), Metavar("DURATION")]
"""Seconds, as a number or a Dask duration string (``500ms``, ``2s``, ``1m``)."""

Threshold = Annotated[float | Literal[False], PlainValidator(_threshold), Metavar("FRACTION|false")]
"""A memory-manager threshold: a fraction of the memory limit, or ``False`` (disabled)."""

Actions = Annotated[
    tuple[RemediationAction, ...], NoDecode, BeforeValidator(_actions), Metavar("ACTION[,ACTION]")
]
"""Remediation actions, written ``gc,trim``; ``NoDecode``: the environment value is not JSON."""


def _dask_memory(key: str, parse: Callable[[Any], Any]) -> Any:
    """Dask's ``distributed.worker.memory.<key>``, parsed; a bad value is a ConfigError."""
    name = f"distributed.worker.memory.{key}"
    try:
        return parse(dask.config.get(name))
    except (ValueError, TypeError) as e:  # e.g. DASK_DISTRIBUTED__WORKER__MEMORY__PAUSE=abc
        raise ConfigError(f"Dask config {name}: {e}") from None


def _dask_threshold(name: str) -> Any:
    """Field whose default is Dask's ``distributed.worker.memory.<name>`` (which may be False)."""
    return Field(
        default_factory=lambda: _dask_memory(name, _threshold),
        description=f"{name} threshold as a fraction of the memory limit, or false (disabled); "
        "set it to the workers' value, which the scheduler does not know; "
        f"the default is Dask's distributed.worker.memory.{name}",
    )


class Settings(BaseSettings):
    """Validated, frozen exporter settings: one field per ``serve`` option and variable."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, frozen=True, extra="forbid", populate_by_name=True
    )

    scheduler: str | None = Field(
        default=None,
        description="scheduler address, e.g. tcp://dask-scheduler:8786; "
        "falls back to $DASK_SCHEDULER_ADDRESS (set by the dask-kubernetes operator)",
    )
    listen: str = Field(default="0.0.0.0:9787", description="HTTP listen address HOST:PORT")
    mode: Mode = Field(
        default="scheduler",
        description="scheduler: the whole cluster from the scheduler; local: only the worker "
        "processes beside the exporter (sidecar), RSS from the OS; both",
    )
    poll_interval: Duration = Field(
        default=0.0,
        ge=0,
        description="minimum time between polls; never faster than the scheduler's heartbeat "
        "interval for the cluster's size (0: follow the heartbeat)",
    )
    timeout: Duration = Field(default=10.0, gt=0, description="time allowed for one poll")
    max_backoff: Duration = Field(
        default=30.0, gt=0, description="longest wait between retries while the scheduler is down"
    )
    stale_after: Annotated[Duration | None, Metavar("DURATION")] = Field(
        default=None,
        gt=0,
        description="how long the last workers heard of are served after the scheduler was "
        "lost, then their series go; unset: five heartbeat intervals, at least 10 s",
    )
    recent_to_old_time: Duration = Field(
        default_factory=lambda: float(_dask_memory("recent-to-old-time", _seconds)),
        gt=0,
        description="time after which unmanaged memory counts as old; "
        "the default is Dask's distributed.worker.memory.recent-to-old-time",
    )
    target: Threshold = _dask_threshold("target")
    spill: Threshold = _dask_threshold("spill")
    pause: Threshold = _dask_threshold("pause")
    terminate: Threshold = _dask_threshold("terminate")
    proc_root: str = Field(
        default="/proc", description="procfs root the local mode reads worker processes from"
    )
    nvml: bool = Field(
        default=True,
        description="in the local and both modes, read each worker process's device memory "
        "through NVML where pynvml (the gpu extra) and a GPU are present; without either, "
        "nothing changes",
    )
    process_metrics: bool = Field(
        default=True, description="export the exporter's own process_* metrics"
    )
    log_level: LogLevel = Field(default="INFO", description="logging level (case-insensitive)")
    tls_ca_file: str | None = Field(
        default=None, description="CA certificate for a tls:// scheduler"
    )
    tls_cert: str | None = Field(
        default=None, description="client certificate for a tls:// scheduler"
    )
    tls_key: str | None = Field(default=None, description="client key for a tls:// scheduler")
    http_max_connections: int = Field(
        default=512,
        ge=1,
        description="most HTTP connections open at once; at the limit the oldest idle one is "
        "closed (capped to the open-file limit minus 192)",
    )
    http_idle_timeout: Duration = Field(
        default=15.0,
        gt=0,
        description="time a connection may stay open without a complete request (idle, "
        "half-sent or slow headers) before it is closed",
    )
    worker_probe_url: str | None = Field(
        default=None,
        description="local mode: an HTTP URL served by the worker's own event loop, e.g. "
        "http://127.0.0.1:8788/health (its dashboard); the sidecar exports the answer's "
        "latency, which climbs while the loop is blocked",
    )
    metric_allowlist: str = Field(
        default="",
        description="comma-separated regular expressions (full match): export only the "
        "metric families they match, as kube-state-metrics' --metric-allowlist",
    )
    metric_denylist: str = Field(
        default="",
        description="comma-separated regular expressions (full match): export none of the "
        "metric families they match; not together with --metric-allowlist",
    )
    cluster_totals_only: bool = Field(
        default=False,
        description="export cluster totals (dask_memory_cluster_*) instead of per-worker "
        "series: a constant number of series whatever the cluster's size",
    )
    web_config_file: str | None = Field(
        default=None,
        description="exporter-toolkit web configuration file (TLS, basic auth), the format "
        "node_exporter's --web.config.file reads; also spelt --web.config.file",
    )
    gateway: str | None = Field(
        default=None,
        description="dask-gateway address, e.g. http://traefik-dask-gateway (instead of "
        "--scheduler): export every running cluster the gateway lists to the token's user, "
        "each series labelled cluster",
    )
    gateway_proxy_address: str | None = Field(
        default=None,
        description="the gateway's scheduler proxy HOST:PORT; unset: dask-gateway's "
        "gateway.proxy-address, else the host and port of --gateway",
    )
    gateway_auth: GatewayAuth = Field(
        default="jupyterhub",
        description="how to authenticate to the gateway: jupyterhub (a JupyterHub API token) "
        "or basic (user --gateway-user, the file holds the password)",
    )
    gateway_user: str = Field(
        default="dask-memory-exporter", description="user name for --gateway-auth basic"
    )
    gateway_api_token_file: str | None = Field(
        default=None,
        description="file holding the gateway credential (the JupyterHub API token, or the "
        "basic-auth password), read again at every listing so a rotated secret is picked up",
    )
    gateway_list_interval: Duration = Field(
        default=5.0,
        gt=0,
        description="time between listings of the gateway's clusters (new clusters appear, "
        "stopped ones go, within this)",
    )

    remediate: Actions = Field(
        default=(),
        description="opt-in remediation: run these actions (gc, trim) on a worker for which "
        "Alertmanager posts a firing DaskWorkerMemoryHighNoDataToSpill to "
        "/alertmanager/webhook; connects to the scheduler as a Dask client only for that "
        "(docs/remediation.md)",
    )
    remediate_token_file: str | None = Field(
        default=None,
        description="file holding the bearer token the webhook requires (at least 16 "
        "characters; re-read when it changes); required with --remediate",
    )
    remediate_interval: Duration = Field(
        default=600.0,
        gt=0,
        description="act on each worker (by worker_name) at most once per this interval; "
        "alerts inside it are refused and counted",
    )
    remediate_dry_run: bool = Field(
        default=False,
        description="remediation logs and counts what it would do and runs nothing on workers",
    )

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, v: object) -> object:
        return v.upper() if isinstance(v, str) else v

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, v: str) -> str:
        parse_listen(v)
        return v

    @field_validator("scheduler")
    @classmethod
    def _check_scheduler(cls, v: str | None) -> str | None:
        if v is None or v == "":
            return None
        try:
            scheme, loc = parse_address(v, strict=False)
        except ValueError as e:
            raise ValueError(f"unparsable scheduler address {v!r}: {e}") from None
        if scheme not in backends:
            known = ", ".join(sorted(backends))
            raise ValueError(f"unknown protocol {scheme!r} in {v!r} (known: {known})")
        host, _, port = loc.rpartition(":")
        if scheme in ("tcp", "tls") and (not host or not port.isdigit()):
            raise ValueError(f"unparsable scheduler address {v!r}: expected {scheme}://HOST:PORT")
        return v

    @field_validator("worker_probe_url")
    @classmethod
    def _check_probe_url(cls, v: str | None) -> str | None:
        if not v:
            return None
        if not re.fullmatch(r"https?://[^/\s]+(/\S*)?", v):
            raise ValueError(f"expected an http:// or https:// URL, got {v!r}")
        return v

    @field_validator("metric_allowlist", "metric_denylist")
    @classmethod
    def _check_patterns(cls, v: str) -> str:
        for pattern in _patterns(v):
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"invalid regular expression {pattern!r}: {e}") from None
        return v

    @field_validator("gateway")
    @classmethod
    def _check_gateway(cls, v: str | None) -> str | None:
        if not v:
            return None
        url = urlsplit(v)
        try:
            url.port  # noqa: B018  (raises on a bad port)
        except ValueError:
            raise ValueError(f"bad port in gateway address {v!r}") from None
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"expected http(s)://HOST[:PORT][/PREFIX], got {v!r}")
        return v.rstrip("/")

    @field_validator("gateway_proxy_address")
    @classmethod
    def _check_proxy(cls, v: str | None) -> str | None:
        if not v:
            return None
        host, _, port = v.removeprefix("gateway://").rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"expected HOST:PORT or gateway://HOST:PORT, got {v!r}")
        return v

    @model_validator(mode="after")
    def _check_modes(self) -> Settings:
        if self.gateway:
            if self.scheduler:
                raise ValueError("--gateway and --scheduler exclude each other: pass one")
            if self.mode != "scheduler":
                raise ValueError("--gateway works only with --mode scheduler")
            if self.remediate:
                raise ValueError("--remediate works with --scheduler only, not --gateway")
            read_secret_file(self.gateway_api_token_file, "--gateway-api-token-file")
            return self
        if self.mode != "local" and not self.scheduler:
            raise ValueError(
                "no scheduler address: pass --scheduler (or --gateway) or set "
                "DASK_SCHEDULER_ADDRESS"
            )
        if self.metric_allowlist and self.metric_denylist:
            raise ValueError("--metric-allowlist and --metric-denylist exclude each other")
        if self.remediate and not self.remediate_token_file:
            raise ValueError("--remediate needs --remediate-token-file (the webhook's token)")
        if self.remediate and not self.scheduler:
            raise ValueError("--remediate needs a scheduler address: it acts through the scheduler")
        return self

    def metric_filter(self) -> Callable[[str], bool] | None:
        """Whether a metric family (its exposed name) is exported; None: all are."""
        allow = [re.compile(p) for p in _patterns(self.metric_allowlist)]
        deny = [re.compile(p) for p in _patterns(self.metric_denylist)]
        if allow:
            return lambda name: any(p.fullmatch(name) for p in allow)
        if deny:
            return lambda name: not any(p.fullmatch(name) for p in deny)
        return None

    @property
    def listen_host(self) -> str:
        return parse_listen(self.listen)[0]

    @property
    def listen_port(self) -> int:
        return parse_listen(self.listen)[1]

    @property
    def thresholds(self) -> dict[str, float]:
        """Memory-manager thresholds as fractions of the limit; disabled ones omitted."""
        pairs: dict[str, float | Literal[False]] = {
            name: getattr(self, name) for name in THRESHOLDS
        }
        return {name: ratio for name, ratio in pairs.items() if ratio is not False}

    def security(self) -> Security:
        """Dask ``Security``: TLS options if given, else Dask's own configuration."""
        if self.tls_ca_file or self.tls_cert or self.tls_key:
            return Security(
                tls_ca_file=self.tls_ca_file,
                tls_client_cert=self.tls_cert,
                tls_client_key=self.tls_key,
                require_encryption=True,
            )
        return Security()


def _patterns(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def read_secret_file(path: str | None, option: str) -> str:
    """The stripped content of a credential file; ValueError naming ``option`` if unusable."""
    if not path:
        raise ValueError(f"{option} is required with --gateway")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read().strip()
    except (OSError, UnicodeDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise ValueError(f"{option} {path}: cannot read: {why}") from None
    if not text:
        raise ValueError(f"{option} {path}: the file is empty")
    return text


def add_settings_options(parser: argparse.ArgumentParser) -> CliSettingsSource[Settings]:
    """Add one ``--kebab-name`` option per Settings field to ``parser`` (``serve``'s).

    pydantic-settings derives each option from its field: the name, the choices of a Literal,
    ``--x/--no-x`` for a boolean, the help from the description and the environment twin.
    ``_add_option`` replaces its default note with the value the model computes now, so
    Dask-derived defaults (thresholds, recent-to-old-time) show their actual values.
    Parse with the parser, then pass ``source(parsed_args=namespace)`` to load_settings.
    """
    return CliSettingsSource(
        Settings,
        root_parser=parser,
        cli_kebab_case=True,
        cli_implicit_flags=True,
        cli_show_env_vars=True,
        add_argument_method=_add_option,
    )


_DEFAULT_NOTE = re.compile(r"\(default(?: factory)?: (?:\(\)|[^()])*\)")  # "()": no actions


# Spellings other exporters use for the same option, accepted as well.
_ALIASES = {"web_config_file": ("--web.config.file",)}


def _add_option(parser: argparse.ArgumentParser, *names: str, **kwargs: Any) -> argparse.Action:
    names = (*names, *_ALIASES.get(kwargs.get("dest", ""), ()))
    field = Settings.model_fields.get(kwargs.get("dest", ""))
    if field is not None:
        note = f"(default: {shown_default(field)})".replace("%", "%%")
        kwargs["help"] = _DEFAULT_NOTE.sub(lambda _: note, kwargs.get("help", ""), count=1)
        if "metavar" in kwargs and not _is_choice(field):  # a type name such as {str,null}
            kwargs["metavar"] = _metavar(field) or kwargs["dest"].upper()
    return parser.add_argument(*names, **kwargs)


def _is_choice(field: FieldInfo) -> bool:
    """A Literal field: the library's ``{a,b,c}`` metavar lists its choices."""
    return get_origin(field.annotation) is Literal


def _metavar(field: FieldInfo) -> str | None:
    return next((m.text for m in field.metadata if isinstance(m, Metavar)), None)


def shown_default(field: FieldInfo) -> str:
    """A field's default as ``--help`` shows it: the model's value, Dask's config included."""
    value = field.get_default(call_default_factory=True, validated_data={})
    if value is None:
        return "unset"
    if value == ():
        return "off"
    if isinstance(value, bool):
        return str(value).lower()
    if _metavar(field) == "DURATION":
        return f"{value:g}s"
    return str(value)


def load_settings(
    overrides: Mapping[str, Any],
    environ: Mapping[str, str] | None = None,
    *,
    cli: CliSettingsSource[Settings] | None = None,
) -> Settings:
    """Build Settings from the command line and the environment; ConfigError on bad input.

    ``cli`` is the source add_settings_options returned, loaded with the parsed arguments;
    ``overrides`` are explicit values (tests, the demo), below the command line and above the
    environment. The scheduler address falls back to ``DASK_SCHEDULER_ADDRESS``, which the
    dask-kubernetes operator sets in every container of a cluster.
    """
    env = os.environ if environ is None else environ
    values = {k: v for k, v in overrides.items() if v is not None}
    gateway = values.get("gateway") or env.get(ENV_PREFIX + "GATEWAY")
    if cli is not None and not gateway:
        gateway = cli().get("gateway")
    # The fallback is for a container of a Dask cluster; an exporter given a gateway is not.
    if "scheduler" not in values and not env.get(ENV_PREFIX + "SCHEDULER") and not gateway:
        fallback = env.get("DASK_SCHEDULER_ADDRESS")
        if fallback:
            values["scheduler"] = fallback  # below --scheduler: the CLI source comes first
    try:
        if cli is None:
            return Settings(**values)
        # BaseSettings' own keyword, unknown to mypy's view of the model's fields
        return Settings(_cli_settings_source=cli, **values)  # type: ignore[call-arg]
    except ValidationError as e:
        raise ConfigError(_one_line(e)) from None
    except SettingsError as e:  # a value the environment or CLI source cannot decode
        raise ConfigError(" ".join(str(e).split())) from None


def _one_line(e: ValidationError) -> str:
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    msg = str(err["msg"]).removeprefix("Value error, ")
    where = f"--{loc.replace('_', '-')}: " if loc else ""
    extra = f" (and {len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
    return f"{where}{msg}{extra}"
