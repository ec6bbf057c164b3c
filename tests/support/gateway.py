"""Test support: a real dask-gateway-server on loopback, and clients of its users.

The server is dask-gateway-server from PyPI (the test extra) with its local backend
(``UnsafeLocalBackend``: every cluster's scheduler and workers are processes of this machine,
run as the current user) and ``SimpleAuthenticator`` (HTTP basic auth, any user name, one
shared password). Its private API, its HTTP proxy and its scheduler (TLS) proxy each bind a
free port on 127.0.0.1. The configuration ends with deploy/dask-gateway/monitoring_user.py,
the snippet the docs tell operators to add, so the exporter's user lists every user's clusters.

On exit the server is stopped with SIGTERM (it stops its clusters), and any scheduler or worker
process left behind is killed.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
from dask_gateway import BasicAuth, Gateway

from tests.support.promstack import free_port

ROOT = Path(__file__).resolve().parents[2]
MONITORING_SNIPPET = ROOT / "deploy" / "dask-gateway" / "monitoring_user.py"
PASSWORD = "gateway-test-password"
EXPORTER_USER = "dask-memory-exporter"

_CONFIG = """\
import sys
bin_dir = {bin_dir!r}
c.DaskGateway.address = "127.0.0.1:{api_port}"
c.Proxy.address = "127.0.0.1:{http_port}"
c.Proxy.tcp_address = "127.0.0.1:{tcp_port}"
c.DaskGateway.backend_class = "dask_gateway_server.backends.local.UnsafeLocalBackend"
c.DaskGateway.authenticator_class = "dask_gateway_server.auth.SimpleAuthenticator"
c.SimpleAuthenticator.password = {password!r}
c.UnsafeLocalBackend.clusters_directory = {clusters!r}
c.ClusterConfig.scheduler_cmd = [bin_dir + "/dask", "scheduler"]
c.ClusterConfig.worker_cmd = [bin_dir + "/dask", "worker"]
c.ClusterConfig.worker_memory = "300 M"
c.ClusterConfig.idle_timeout = 0
"""


@dataclass(frozen=True)
class GatewayServer:
    """A running dask-gateway-server: where it listens and its process."""

    url: str
    """The public HTTP address (the proxy), what clients and the exporter are given."""
    proxy_address: str
    """The scheduler proxy, ``HOST:PORT``."""
    proc: subprocess.Popen[bytes]
    workdir: Path

    def client(self, user: str) -> Gateway:
        """An asynchronous dask-gateway client logged in as ``user`` (call in a running loop)."""
        return Gateway(
            self.url,
            proxy_address=f"gateway://{self.proxy_address}",
            auth=BasicAuth(user, PASSWORD),
            asynchronous=True,
        )

    def log(self) -> str:
        return (self.workdir / "gateway.log").read_text(errors="replace")[-4000:]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/api/health", timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


@contextlib.contextmanager
def run_gateway(workdir: Path, startup_timeout: float = 60) -> Iterator[GatewayServer]:
    """Run dask-gateway-server until the context exits (see the module docstring)."""
    workdir.mkdir(parents=True, exist_ok=True)
    api, http, tcp = free_port(), free_port(), free_port()
    config = _CONFIG.format(
        bin_dir=str(Path(sys.executable).parent),
        api_port=api,
        http_port=http,
        tcp_port=tcp,
        password=PASSWORD,
        clusters=str(workdir / "clusters"),
    )
    config += "\n" + MONITORING_SNIPPET.read_text()
    (workdir / "dask_gateway_config.py").write_text(config)
    server_bin = str(Path(sys.executable).parent / "dask-gateway-server")
    with (workdir / "gateway.log").open("wb") as out:
        proc = subprocess.Popen(
            [server_bin, "-f", str(workdir / "dask_gateway_config.py")],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=workdir,
        )
    server = GatewayServer(f"http://127.0.0.1:{http}", f"127.0.0.1:{tcp}", proc, workdir)
    try:
        deadline = time.monotonic() + startup_timeout
        while not _healthy(server.url):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"dask-gateway-server did not start:\n{server.log()}")
            time.sleep(0.2)
        yield server
    finally:
        stop_gateway(server)


def stop_gateway(server: GatewayServer) -> None:
    """SIGTERM the server (it stops its clusters), then kill whatever it left behind."""
    children: list[psutil.Process] = []
    with contextlib.suppress(psutil.Error):
        children = psutil.Process(server.proc.pid).children(recursive=True)
    # Schedulers and workers run in sessions of their own: find them by working directory.
    clusters = str(server.workdir / "clusters")
    for p in psutil.process_iter(["cwd"]):
        with contextlib.suppress(psutil.Error):
            if (p.info["cwd"] or "").startswith(clusters):
                children.append(p)
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait(timeout=10)
    _, alive = psutil.wait_procs(children, timeout=15)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
