"""Settings: the only module that reads the environment and Dask's configuration.

Every option has an environment twin ``DASK_MEMORY_EXPORTER_<NAME>``; command-line values win
over the environment, which wins over Dask's configuration (``distributed.worker.memory.*``)
and the built-in defaults. Units are parsed once here, with Dask's own parsers, so the rest of
the code deals in plain seconds and fractions.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Literal

import dask.config
from dask.utils import parse_timedelta
from distributed.comm.addressing import parse_address
from distributed.comm.registry import backends
from distributed.security import Security
from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["ConfigError", "Settings", "load_settings", "parse_listen"]

ENV_PREFIX = "DASK_MEMORY_EXPORTER_"
Mode = Literal["scheduler", "local", "both"]


class ConfigError(ValueError):
    """An invalid option: reported as one line, exit status 2."""


def parse_listen(value: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[v6]:PORT`` for IPv6); port 0 means any free port."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


def _dask_memory(key: str) -> Any:
    return dask.config.get(f"distributed.worker.memory.{key}")


def _threshold_default(key: str) -> float:
    """Dask's own setting; ``False`` (feature disabled) becomes 0 so the series is omitted."""
    value = _dask_memory(key)
    return float(value) if value else 0.0


class Settings(BaseSettings):
    """Validated, frozen exporter settings."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, frozen=True, extra="forbid", populate_by_name=True
    )

    scheduler: str | None = Field(
        default=None,
        description="Scheduler address, e.g. tcp://dask-scheduler:8786 "
        "(default: $DASK_SCHEDULER_ADDRESS)",
    )
    listen: str = Field(default="0.0.0.0:9787", description="HTTP listen address HOST:PORT")
    mode: Mode = Field(
        default="scheduler",
        description="scheduler: whole cluster from the scheduler; local: only worker processes "
        "beside the exporter (sidecar); both",
    )
    poll_interval: float = Field(
        default=0.0,
        ge=0,
        description="Minimum seconds between polls; never faster than the scheduler's heartbeat "
        "interval for the cluster's size (0: follow the heartbeat)",
    )
    timeout: float = Field(default=10.0, gt=0, description="Seconds allowed for one poll")
    max_backoff: float = Field(
        default=30.0, gt=0, description="Longest wait between retries while the scheduler is down"
    )
    recent_to_old_time: float = Field(
        default_factory=lambda: float(parse_timedelta(_dask_memory("recent-to-old-time"))),
        gt=0,
        description="Seconds before unmanaged memory counts as old "
        "(distributed.worker.memory.recent-to-old-time)",
    )
    target: float = Field(default_factory=lambda: _threshold_default("target"), ge=0, le=1)
    spill: float = Field(default_factory=lambda: _threshold_default("spill"), ge=0, le=1)
    pause: float = Field(default_factory=lambda: _threshold_default("pause"), ge=0, le=1)
    terminate: float = Field(default_factory=lambda: _threshold_default("terminate"), ge=0, le=1)
    proc_root: str = Field(default="/proc", description="procfs root (local mode)")
    process_metrics: bool = Field(
        default=True, description="Export the exporter's own process_* metrics"
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    tls_ca_file: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    http_max_connections: int = Field(
        default=512,
        ge=1,
        description="Most HTTP connections open at once; at the limit the oldest idle one is "
        "closed (capped to the open-file limit minus 192)",
    )
    http_idle_timeout: float = Field(
        default=15.0,
        gt=0,
        description="Seconds a connection may stay open without a complete request (idle, "
        "half-sent or slow headers) before it is closed",
    )
    web_config_file: str | None = Field(
        default=None,
        description="Exporter-toolkit web configuration file (TLS, basic auth), the format "
        "node_exporter's --web.config.file reads",
    )

    @field_validator(
        "poll_interval",
        "timeout",
        "max_backoff",
        "recent_to_old_time",
        "http_idle_timeout",
        mode="before",
    )
    @classmethod
    def _seconds(cls, v: object) -> object:
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

    @model_validator(mode="after")
    def _check_modes(self) -> Settings:
        if self.mode != "local" and not self.scheduler:
            raise ValueError("no scheduler address: pass --scheduler or set DASK_SCHEDULER_ADDRESS")
        return self

    @property
    def listen_host(self) -> str:
        return parse_listen(self.listen)[0]

    @property
    def listen_port(self) -> int:
        return parse_listen(self.listen)[1]

    @property
    def thresholds(self) -> dict[str, float]:
        """Memory-manager thresholds as fractions of the limit; disabled ones omitted."""
        pairs = {
            "target": self.target,
            "spill": self.spill,
            "pause": self.pause,
            "terminate": self.terminate,
        }
        return {k: v for k, v in pairs.items() if v > 0}

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


def load_settings(
    overrides: Mapping[str, Any], environ: Mapping[str, str] | None = None
) -> Settings:
    """Build Settings from CLI overrides and the environment; raise ConfigError on bad input.

    ``overrides`` holds only the options given on the command line (None values dropped).
    The scheduler address falls back to ``DASK_SCHEDULER_ADDRESS``, which the dask-kubernetes
    operator sets in every container of a cluster.
    """
    env = os.environ if environ is None else environ
    values = {k: v for k, v in overrides.items() if v is not None}
    if "scheduler" not in values and not env.get(ENV_PREFIX + "SCHEDULER"):
        fallback = env.get("DASK_SCHEDULER_ADDRESS")
        if fallback:
            values["scheduler"] = fallback
    try:
        return Settings(**values)
    except ValidationError as e:
        raise ConfigError(_one_line(e)) from None


def _one_line(e: ValidationError) -> str:
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    msg = str(err["msg"]).removeprefix("Value error, ")
    where = f"--{loc.replace('_', '-')}: " if loc else ""
    extra = f" (and {len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
    return f"{where}{msg}{extra}"
