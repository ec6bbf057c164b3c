"""The exporter-toolkit web configuration file (``--web.config.file``): TLS and basic auth.

The same YAML file that node_exporter and the other Prometheus exporters read works here
unchanged::

    tls_server_config:
      cert_file: server.crt          # relative paths: relative to this file's folder
      key_file: server.key
      client_auth_type: RequireAndVerifyClientCert   # optional
      client_ca_file: ca.crt
      min_version: TLS12
    basic_auth_users:
      prometheus: $2y$10$...         # bcrypt hashes (htpasswd -nBC 10 "" | tr -d ':')

Supported: ``cert_file``/``key_file`` or inline ``cert``/``key``, ``client_ca_file`` or
inline ``client_ca``, ``client_auth_type`` ``NoClientCert``, ``VerifyClientCertIfGiven`` and
``RequireAndVerifyClientCert`` (Python's ssl cannot ask for a certificate without verifying
it, so ``RequestClientCert`` and ``RequireAnyClientCert`` are refused), ``min_version`` and
``max_version``. Accepted but not applied, with one warning: ``cipher_suites``,
``curve_preferences``, ``prefer_server_cipher_suites`` (Go names; OpenSSL's defaults apply),
``client_allowed_sans``, ``http_server_config`` and ``rate_limit``. Any other key is an error,
as in the toolkit.

The file and the files it names are checked every second; a changed, valid file takes effect
for the next request (users) or the next connection (TLS: the listener is reopened with the
new context). A changed, invalid file keeps the previous configuration and logs one line.
``/healthz`` and ``/readyz`` never ask for credentials, so the kubelet's probes work (see
docs/kubernetes.md).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import hashlib
import logging
import os
import ssl
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bcrypt
import yaml
from aiohttp import web

from .config import ConfigError

__all__ = [
    "UNAUTHENTICATED_PATHS",
    "WEB_CONFIG",
    "WebConfig",
    "WebConfigError",
    "WebConfigWatcher",
    "load_web_config",
    "www_authenticate",
]

logger = logging.getLogger(__name__)

UNAUTHENTICATED_PATHS = frozenset({"/healthz", "/readyz"})
REALM = "dask-memory-exporter"
CHECK_INTERVAL = 1.0  # seconds between looks at the files' modification times

_TLS_KEYS = {
    "cert_file",
    "key_file",
    "cert",
    "key",
    "client_auth_type",
    "client_ca_file",
    "client_ca",
    "client_allowed_sans",
    "min_version",
    "max_version",
    "cipher_suites",
    "prefer_server_cipher_suites",
    "curve_preferences",
}
_IGNORED_TLS = ("cipher_suites", "curve_preferences", "prefer_server_cipher_suites")
_TOP_KEYS = {"tls_server_config", "http_server_config", "basic_auth_users", "rate_limit"}
_CLIENT_AUTH = {
    "NoClientCert": ssl.CERT_NONE,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
_VERSIONS = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}


class WebConfigError(ConfigError):
    """An invalid web configuration file: one line, exit 2 at start."""


@dataclass(frozen=True)
class WebConfig:
    """One valid reading of the file: a server TLS context (or None) and bcrypt hashes."""

    path: Path
    tls: ssl.SSLContext | None
    users: Mapping[str, bytes]
    tls_signature: str  # changes when the TLS part or the files it names change
    warnings: tuple[str, ...] = ()


def load_web_config(path: str | os.PathLike[str]) -> WebConfig:
    """Read and validate the file; raise WebConfigError with one line on any problem."""
    p = Path(path)
    try:
        doc = yaml.safe_load(p.read_text())
    except OSError as e:
        raise WebConfigError(f"--web.config.file {p}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise WebConfigError(f"--web.config.file {p}: not valid YAML{line}") from None
    doc = doc or {}
    if not isinstance(doc, dict):
        raise WebConfigError(f"--web.config.file {p}: expected a mapping at the top level")
    _no_unknown(p, doc, _TOP_KEYS, "")
    warnings = [
        f"{k} is accepted but not applied" for k in ("http_server_config", "rate_limit") if k in doc
    ]
    tls_doc = doc.get("tls_server_config")
    tls, signature, tls_warnings = _tls(p, tls_doc) if tls_doc else (None, "", [])
    users = _users(p, doc.get("basic_auth_users"))
    return WebConfig(p, tls, users, signature, tuple(warnings + tls_warnings))


def _fail(path: Path, message: str) -> WebConfigError:
    return WebConfigError(f"--web.config.file {path}: {message}")


def _no_unknown(path: Path, doc: Mapping[str, Any], known: set[str], prefix: str) -> None:
    unknown = sorted(set(doc) - known)
    if unknown:
        raise _fail(path, f"unknown field {prefix}{unknown[0]}")


def _users(path: Path, doc: Any) -> dict[str, bytes]:
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise _fail(path, "basic_auth_users must map user names to bcrypt hashes")
    users = {}
    for user, hashed in doc.items():
        if not isinstance(hashed, str):
            raise _fail(path, f"basic_auth_users.{user}: expected a bcrypt hash")
        h = hashed.encode()
        try:
            bcrypt.checkpw(b"", h)  # validates the hash's format and cost
        except ValueError:
            raise _fail(path, f"basic_auth_users.{user}: not a bcrypt hash") from None
        users[str(user)] = h
    return users


def _tls(path: Path, doc: Any) -> tuple[ssl.SSLContext, str, list[str]]:
    if not isinstance(doc, dict):
        raise _fail(path, "tls_server_config must be a mapping")
    _no_unknown(path, doc, _TLS_KEYS, "tls_server_config.")
    base = path.parent

    def file_of(key: str) -> Path | None:
        value = doc.get(key)
        return None if not value else (base / str(value))

    cert_file, key_file, ca_file = (
        file_of("cert_file"),
        file_of("key_file"),
        file_of("client_ca_file"),
    )
    if (cert_file is None) == (doc.get("cert") is None):
        raise _fail(path, "tls_server_config needs exactly one of cert_file and cert")
    if (key_file is None) == (doc.get("key") is None):
        raise _fail(path, "tls_server_config needs exactly one of key_file and key")
    auth_type = str(doc.get("client_auth_type") or "NoClientCert")
    if auth_type not in _CLIENT_AUTH:
        supported = ", ".join(_CLIENT_AUTH)
        raise _fail(path, f"client_auth_type {auth_type} is not supported (use {supported})")
    has_ca = ca_file is not None or doc.get("client_ca") is not None
    if auth_type != "NoClientCert" and not has_ca:
        raise _fail(path, f"client_auth_type {auth_type} needs client_ca_file")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = _version(path, doc, "min_version", "TLS12")
    ctx.maximum_version = _version(path, doc, "max_version", "TLS13")
    try:
        with tempfile.TemporaryDirectory(prefix="web-config-") as tmp:
            cert = cert_file or _inline(Path(tmp) / "cert.pem", doc["cert"])
            key = key_file or _inline(Path(tmp) / "key.pem", doc["key"])
            ctx.load_cert_chain(cert, key)
            if ca_file is not None:
                ctx.load_verify_locations(cafile=ca_file)
            elif doc.get("client_ca") is not None:
                ctx.load_verify_locations(cadata=str(doc["client_ca"]))
    except FileNotFoundError as e:
        raise _fail(path, f"{e.filename}: no such file") from None
    except (ssl.SSLError, OSError, ValueError) as e:
        raise _fail(path, f"tls_server_config: {getattr(e, 'reason', None) or e}") from None
    ctx.verify_mode = _CLIENT_AUTH[auth_type]
    warnings = [
        f"tls_server_config.{k} is accepted but not applied" for k in _IGNORED_TLS if k in doc
    ]
    if doc.get("client_allowed_sans"):
        warnings.append("tls_server_config.client_allowed_sans is accepted but not applied")
    files = [f for f in (cert_file, key_file, ca_file) if f is not None]
    return ctx, _signature(repr(sorted(doc.items())), files), warnings


def _inline(path: Path, pem: Any) -> Path:
    path.write_text(str(pem))
    return path


def _version(path: Path, doc: Mapping[str, Any], key: str, default: str) -> ssl.TLSVersion:
    name = str(doc.get(key) or default)
    if name not in _VERSIONS:
        raise _fail(path, f"{key} {name} is not one of {', '.join(_VERSIONS)}")
    return _VERSIONS[name]


def _signature(text: str, files: list[Path]) -> str:
    parts = [text]
    for f in files:
        try:
            st = f.stat()
            parts.append(f"{f}:{st.st_mtime_ns}:{st.st_size}")
        except OSError:
            parts.append(f"{f}:missing")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


@dataclass
class WebConfigWatcher:
    """The configuration in force, re-read when the file or the files it names change.

    ``check()`` (called about every second by the server) returns the new WebConfig when a
    change produced a valid file, else None; an invalid change is logged once and the
    previous configuration stays. Basic-auth checks run bcrypt in a thread, at most two at a
    time, and remember successful (user, password) pairs until the next change, as the
    toolkit does, so a scrape costs one bcrypt per reload rather than one per request.
    """

    current: WebConfig
    _stamp: str = ""
    _bad_stamp: str = ""
    _last_check: float = 0.0
    _good: set[tuple[str, bytes]] = field(default_factory=set)
    _sem: asyncio.Semaphore | None = None

    def __post_init__(self) -> None:
        self._stamp = self._probe_stamp()
        for w in self.current.warnings:
            logger.warning("web config %s: %s", self.current.path, w)

    def check(self) -> WebConfig | None:
        """Re-read if anything changed; the new configuration, or None."""
        now = time.monotonic()
        if now - self._last_check < CHECK_INTERVAL:
            return None
        self._last_check = now
        stamp = self._probe_stamp()
        if stamp == self._stamp or stamp == self._bad_stamp:
            return None
        try:
            new = load_web_config(self.current.path)
        except WebConfigError as e:
            self._bad_stamp = stamp
            logger.error("%s; keeping the previous configuration", e)
            return None
        if (new.tls is None) != (self.current.tls is None):
            self._bad_stamp = stamp
            logger.error(
                "web config %s: TLS cannot be switched on or off without a restart; "
                "keeping the previous configuration",
                new.path,
            )
            return None
        self.current = new
        self._stamp = stamp
        self._good.clear()
        logger.info("web config %s reloaded", new.path)
        for w in new.warnings:
            logger.warning("web config %s: %s", new.path, w)
        return new

    def _probe_stamp(self) -> str:
        """A stamp of the file and, through a fresh parse-free stat, the TLS files."""
        try:
            st = self.current.path.stat()
            base = f"{st.st_mtime_ns}:{st.st_size}"
        except OSError:
            base = "missing"
        return base + ":" + self._tls_files_stamp()

    def _tls_files_stamp(self) -> str:
        # The files named by the current configuration: a rotated certificate is a change.
        try:
            doc = yaml.safe_load(self.current.path.read_text()) or {}
        except (OSError, yaml.YAMLError):
            return "unreadable"
        tls = doc.get("tls_server_config") if isinstance(doc, dict) else None
        if not isinstance(tls, dict):
            return ""
        files = [
            self.current.path.parent / str(tls[k])
            for k in ("cert_file", "key_file", "client_ca_file")
            if tls.get(k)
        ]
        return _signature("", files)

    @property
    def auth_required(self) -> bool:
        return bool(self.current.users)

    async def authorized(self, header: str | None) -> bool:
        """Whether an ``Authorization`` header names a user of the file with her password."""
        users = self.current.users
        credentials = _basic(header)
        if credentials is None:
            return False
        user, password = credentials
        digest = hashlib.sha256(password).digest()
        if (user, digest) in self._good:
            return True
        # An unknown user still costs one bcrypt, so timing does not tell users apart.
        hashed = users.get(user) or _dummy_hash()
        if self._sem is None:
            self._sem = asyncio.Semaphore(2)
        async with self._sem:
            ok = await asyncio.to_thread(bcrypt.checkpw, password, hashed)
        if ok and user in users and self.current.users is users:
            self._good.add((user, digest))
        return ok and user in users


@functools.cache
def _dummy_hash() -> bytes:
    return bcrypt.hashpw(b"not a password", bcrypt.gensalt(rounds=10))


WEB_CONFIG = web.AppKey("web_config", WebConfigWatcher)


def _basic(header: str | None) -> tuple[str, bytes] | None:
    if not header:
        return None
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    user, sep, password = decoded.partition(b":")
    if not sep:
        return None
    return user.decode("utf-8", "replace"), password


def www_authenticate() -> str:
    return f'Basic realm="{REALM}", charset="UTF-8"'
