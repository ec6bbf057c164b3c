"""TLS and basic auth from an exporter-toolkit web configuration file, over real HTTPS.

Certificates are made here with ``cryptography`` (a CA, a server certificate for
127.0.0.1, a client certificate); the exporter is the real ``serve`` subprocess and the
scraper the real Prometheus binary.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import os
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import bcrypt
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from benchmarks.http_abuse import get, serve
from tests.support.promstack import run_prometheus

PASSWORD = "s3cret-scraper"


@dataclass
class Pki:
    dir: Path
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _issue(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name,
    issuer_key: ec.EllipticCurvePrivateKey,
    ca: bool = False,
    san_ip: str | None = None,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    b = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if san_ip:
        b = b.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(san_ip))]),
            critical=False,
        )
    return b.sign(issuer_key, hashes.SHA256())


def _write(path: Path, obj: x509.Certificate | ec.EllipticCurvePrivateKey) -> Path:
    if isinstance(obj, x509.Certificate):
        path.write_bytes(obj.public_bytes(serialization.Encoding.PEM))
    else:
        path.write_bytes(
            obj.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return path


def make_pki(d: Path, server_cn: str = "exporter") -> Pki:
    d.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _issue("test CA", ca_key, _name("test CA"), ca_key, ca=True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = _issue(server_cn, server_key, ca.subject, ca_key, san_ip="127.0.0.1")
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = _issue("prometheus", client_key, ca.subject, ca_key)
    return Pki(
        d,
        _write(d / "ca.crt", ca),
        _write(d / "server.crt", server),
        _write(d / "server.key", server_key),
        _write(d / "client.crt", client),
        _write(d / "client.key", client_key),
    )


def _hash(password: str) -> str:
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=10)).decode()


def write_web_config(path: Path, pki: Pki | None, users: dict[str, str], **tls: str) -> Path:
    doc: dict[str, object] = {}
    if pki is not None:
        # Relative paths, as node_exporter resolves them: against the file's folder.
        doc["tls_server_config"] = {
            "cert_file": os.path.relpath(pki.server_cert, path.parent),
            "key_file": os.path.relpath(pki.server_key, path.parent),
            **tls,
        }
    if users:
        doc["basic_auth_users"] = {u: _hash(p) for u, p in users.items()}
    path.write_text(yaml.safe_dump(doc))
    return path


def client_context(pki: Pki, cert: bool = False) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    if cert:
        ctx.load_cert_chain(str(pki.client_cert), str(pki.client_key))
    return ctx


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def _peer_cn(port: int, ctx: ssl.SSLContext) -> str:
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
            der = s.getpeercert(binary_form=True)
    assert der is not None
    cert = x509.load_der_x509_certificate(der)
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def _eventually(check: object, timeout: float = 15) -> None:
    assert callable(check)
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.2)


# --- TLS + basic auth over HTTPS ------------------------------------------------------


def test_tls_and_basic_auth(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    conf = write_web_config(tmp_path / "web.yml", pki, {"prometheus": PASSWORD})
    ctx = client_context(pki)
    with serve(
        "--web.config.file", str(conf), workdir=tmp_path, scheme="https", ssl_context=ctx
    ) as ex:
        url = ex.url
        assert get(url + "/metrics", context=ctx)[0] == 401
        status, headers, _ = get(url + "/metrics", basic("prometheus", "wrong"), context=ctx)
        assert status == 401
        assert headers["WWW-Authenticate"].startswith("Basic realm=")
        assert get(url + "/metrics", basic("nobody", PASSWORD), context=ctx)[0] == 401
        assert get(url + "/", context=ctx)[0] == 401
        status, headers, body = get(url + "/metrics", basic("prometheus", PASSWORD), context=ctx)
        assert status == 200 and b"# HELP" in body
        assert headers["X-Content-Type-Options"] == "nosniff"
        # The kubelet's probes need no credentials.
        assert get(url + "/healthz", context=ctx)[0] == 200
        assert get(url + "/readyz", context=ctx)[0] in (200, 503)
        # Plain HTTP on the TLS port gets nothing useful.
        assert get(f"http://127.0.0.1:{ex.port}/metrics")[0] in (0, 400)
        # Env twin of the option works the same way (checked through the startup line).
        assert "serving on https://" in ex.log()
        assert "Traceback" not in ex.log()


def test_env_twin_and_client_certificates_and_min_version(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    conf = write_web_config(
        tmp_path / "web.yml",
        pki,
        {},
        client_auth_type="RequireAndVerifyClientCert",
        client_ca_file="pki/ca.crt",
        min_version="TLS13",
    )
    with_cert = client_context(pki, cert=True)
    with serve(
        workdir=tmp_path,
        env={"DASK_MEMORY_EXPORTER_WEB_CONFIG_FILE": str(conf)},
        scheme="https",
        ssl_context=with_cert,
    ) as ex:
        assert get(ex.url + "/metrics", context=with_cert)[0] == 200
        assert get(ex.url + "/metrics", context=client_context(pki))[0] == 0  # no cert
        old = client_context(pki, cert=True)
        old.maximum_version = ssl.TLSVersion.TLSv1_2
        assert get(ex.url + "/metrics", context=old)[0] == 0  # below min_version
        time.sleep(0.3)
        assert "Traceback" not in ex.log()


# --- reload ---------------------------------------------------------------------------


def test_reload_users_and_certificate_and_keep_old_on_bad_file(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki", server_cn="first")
    conf = write_web_config(tmp_path / "web.yml", pki, {"prometheus": PASSWORD})
    ctx = client_context(pki)
    with serve(
        "--web.config.file", str(conf), workdir=tmp_path, scheme="https", ssl_context=ctx
    ) as ex:
        url = ex.url + "/metrics"
        assert get(url, basic("prometheus", PASSWORD), context=ctx)[0] == 200
        # New users: the old password stops working, the new one works.
        write_web_config(conf, pki, {"prometheus": "rotated"})
        _eventually(lambda: get(url, basic("prometheus", "rotated"), context=ctx)[0] == 200)
        assert get(url, basic("prometheus", PASSWORD), context=ctx)[0] == 401
        # A broken file: the previous configuration stays, one line says why.
        before = len(ex.log_lines())
        conf.write_text("basic_auth_users: [not, a, mapping\n")
        time.sleep(3)
        assert get(url, basic("prometheus", "rotated"), context=ctx)[0] == 200
        new_lines = ex.log_lines()[before:]
        assert len([x for x in new_lines if "keeping the previous" in x]) == 1, new_lines
        write_web_config(conf, pki, {"prometheus": "rotated"})
        _eventually(lambda: "web config" in ex.log_lines()[-1])
        # A rotated certificate (same file names, new content, the web config untouched, as
        # when cert-manager renews a Secret) is served without a restart.
        rotated = make_pki(tmp_path / "pki2", server_cn="second")
        (tmp_path / "pki" / "server.key").write_bytes(rotated.server_key.read_bytes())
        (tmp_path / "pki" / "server.crt").write_bytes(rotated.server_cert.read_bytes())
        ctx2 = client_context(rotated)
        _eventually(lambda: get(url, basic("prometheus", "rotated"), context=ctx2)[0] == 200)
        assert _peer_cn(ex.port, ctx2) == "second"
        assert "Traceback" not in ex.log()


# --- invalid files at start -----------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no such file"),
        ("tls_server_config: [", "not valid YAML"),
        ("tls_server_config:\n  cert_file: x.crt\n  key_file: x.key\n", "no such file"),
        ("basic_auth_users:\n  alice: plaintext\n", "not a bcrypt hash"),
        ("unknown_thing: 1\n", "unknown field unknown_thing"),
        (
            "tls_server_config:\n  cert_file: a\n  key_file: b\n  client_auth_type: Maybe\n",
            "client_auth_type Maybe is not supported",
        ),
    ],
)
def test_invalid_file_at_start_is_one_line_exit_2(
    tmp_path: Path, content: str | None, message: str
) -> None:
    conf = tmp_path / "web.yml"
    if content is not None:
        conf.write_text(content)
    proc = subprocess.run(
        [sys.executable, "-m", "dask_memory_exporter", "serve", "--mode", "local",
         "--listen", "127.0.0.1:0", "--web.config.file", str(conf)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("dask-memory-exporter: error: --web.config.file "), lines
    assert message.lower() in lines[0].lower(), lines


# --- the real Prometheus --------------------------------------------------------------


def test_prometheus_scrapes_over_tls_with_basic_auth(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    conf = write_web_config(tmp_path / "web.yml", pki, {"prometheus": PASSWORD})
    ctx = client_context(pki)
    with serve(
        "--web.config.file", str(conf), workdir=tmp_path, scheme="https", ssl_context=ctx
    ) as ex:
        target = f"127.0.0.1:{ex.port}"
        tls = {"ca_file": str(pki.ca), "server_name": "127.0.0.1"}
        jobs = [
            {
                "job_name": "with-credentials",
                "scheme": "https",
                "scrape_interval": "1s",
                "scrape_timeout": "1s",
                "tls_config": tls,
                "basic_auth": {"username": "prometheus", "password": PASSWORD},
                "static_configs": [{"targets": [target]}],
            },
            {
                "job_name": "without-credentials",
                "scheme": "https",
                "scrape_interval": "1s",
                "scrape_timeout": "1s",
                "tls_config": tls,
                "static_configs": [{"targets": [target]}],
            },
        ]
        with run_prometheus(extra_scrape_configs=jobs) as prom:
            prom.wait_for('up{job="with-credentials"} == 1', timeout=30)
            prom.wait_for('up{job="without-credentials"} == 0', timeout=30)
            assert prom.query_scalar('up{job="with-credentials"}') == 1
            # The scraped series arrived over TLS: the exporter's own self-metrics.
            prom.wait_for('dask_memory_exporter_build_info{job="with-credentials"}', timeout=30)
            errors = [t for t in prom.targets() if t["labels"]["job"] == "without-credentials"]
            assert "401" in errors[0]["lastError"], errors
