"""Gateway mode without a gateway: the round logic of GatewayPoller, and GatewayLister's errors.

The Poller side uses stand-in listers and scheduler sources (a hung scheduler cannot be made
to hang on cue for real; tests/e2e/test_gateway.py runs the whole mode against a real
dask-gateway-server). The lister's errors come from real HTTP: a closed port and a small
aiohttp server answering as a gateway that refuses the credential.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from aiohttp import web
from distributed.security import Security

from dask_memory_exporter.gateway import (
    GATEWAY_CLUSTERS,
    GATEWAY_UNUSABLE_CLUSTERS,
    GATEWAY_UP,
    ClusterEntry,
    GatewayLister,
    GatewayPoller,
)
from dask_memory_exporter.snapshot import Snapshot
from dask_memory_exporter.source import SourceError
from tests.support.promstack import free_port
from tests.unit.test_poller import Scheduler, info


class Lister:
    """Answers with the clusters a test sets, or raises while ``fail`` is set."""

    def __init__(self, *names: str) -> None:
        self.names = list(names)
        self.fail: SourceError | None = None
        self.closed = 0

    async def list(self) -> list[ClusterEntry]:
        if self.fail is not None:
            raise self.fail
        return [ClusterEntry(n, f"gateway://proxy:8786/{n}", Security()) for n in self.names]

    async def close(self) -> None:
        self.closed += 1


class Sources:
    """One stand-in scheduler per cluster name, made when the poller asks for it."""

    def __init__(self) -> None:
        self.made: dict[str, Scheduler] = {}
        self.closed: list[str] = []

    def __call__(self, entry: ClusterEntry) -> Any:
        source = self.made.setdefault(entry.name, Scheduler(info(f"tcp://{entry.name}:1")))
        closed = self.closed

        async def close() -> None:
            closed.append(entry.name)

        source.close = close  # type: ignore[method-assign]
        return source


def gateway_poller(lister: Lister, sources: Sources, **kw: Any) -> GatewayPoller:
    async def publish(s: Snapshot) -> None:
        pass

    kw.setdefault("list_interval", 0.0)
    return GatewayPoller(lister, sources, 30.0, {"spill": 0.7}, publish, **kw)  # type: ignore[arg-type]


def workers(snap: Snapshot) -> dict[str, list[str]]:
    return {c: [w.info.address for w in s.workers] for c, s in snap.clusters.items()}


async def test_clusters_come_and_go_with_the_listing() -> None:
    lister, sources = Lister("a", "b"), Sources()
    p = gateway_poller(lister, sources)
    snap = await p.poll_once()
    assert snap is not None
    assert workers(snap) == {"a": ["tcp://a:1"], "b": ["tcp://b:1"]}
    assert snap.source_gauges == {
        GATEWAY_UP: 1.0,
        GATEWAY_CLUSTERS: 2.0,
        GATEWAY_UNUSABLE_CLUSTERS: 0.0,
    }
    assert all(s.scheduler_up for s in snap.clusters.values())
    lister.names = ["b", "c"]
    snap = await p.poll_once()
    assert snap is not None
    assert workers(snap) == {"b": ["tcp://b:1"], "c": ["tcp://c:1"]}
    assert sources.closed == ["a"]  # the gone cluster's connection is closed
    await p.close()
    assert sorted(sources.closed) == ["a", "b", "c"] and lister.closed == 1


async def test_a_hung_cluster_does_not_delay_the_others() -> None:
    """Each round waits one budget: a fetch still running is left in flight."""
    lister, sources = Lister("slow", "fast"), Sources()
    p = gateway_poller(lister, sources, budget=0.05)
    await p.poll_once()  # makes the sources
    sources.made["slow"].hang = True
    sources.made["fast"].workers = {
        w.address: w for w in (info("tcp://fast:1"), info("tcp://fast:2"))
    }
    for _ in range(3):  # each round returns although "slow" never answers
        p.due = dict.fromkeys(p.due, 0.0)
        snap = await p.poll_once()
    assert snap is not None
    assert workers(snap)["fast"] == ["tcp://fast:1", "tcp://fast:2"]
    assert workers(snap)["slow"] == ["tcp://slow:1"]  # the last figures heard, still served
    assert sources.made["slow"].calls == 2  # one fetch in flight, not one per round
    await p.close()


async def test_a_failing_listing_is_counted_and_keeps_the_clusters() -> None:
    lister, sources = Lister("a"), Sources()
    p = gateway_poller(lister, sources, max_backoff=0.01)
    await p.poll_once()
    lister.fail = SourceError("auth", "HTTP 401")
    for _ in range(3):
        p._list_at = 0.0
        snap = await p.poll_once()
    assert snap is not None
    assert snap.source_gauges[GATEWAY_UP] == 0.0
    assert snap.source_gauges[GATEWAY_CLUSTERS] == 1.0
    (status,) = snap.sources
    assert status.name == "gateway" and not status.success
    assert dict(status.errors)["auth"] == 3
    assert workers(snap) == {"a": ["tcp://a:1"]}
    await p.close()


# --- GatewayLister against real HTTP ---------------------------------------------------------
def lister(url: str, token: Path, auth: str = "jupyterhub") -> GatewayLister:
    return GatewayLister(
        url, proxy_address=None, auth=auth, user="monitor", token_file=str(token), timeout=5.0
    )


async def reason(lister: GatewayLister) -> str:
    try:
        await lister.list()
    except SourceError as e:
        return e.reason
    finally:
        await lister.close()
    raise AssertionError("the listing should have failed")


async def test_lister_errors_have_reasons(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("secret\n")
    assert await reason(lister(f"http://127.0.0.1:{free_port()}", token)) == "refused"
    seen: list[str] = []

    async def clusters(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization", ""))
        if request.headers.get("Authorization") != "jupyterhub secret":
            return web.json_response(
                {"error": "no"}, status=401, headers={"WWW-Authenticate": "jupyterhub"}
            )
        return web.json_response({"error": "broken"}, status=500)

    async def html(request: web.Request) -> web.Response:
        return web.Response(text="<html>not a gateway</html>", content_type="text/html")

    app = web.Application()
    app.router.add_get("/api/v1/clusters/", clusters)
    app.router.add_get("/web/api/v1/clusters/", html)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        url = f"http://127.0.0.1:{port}"
        assert await reason(lister(url, token)) == "http"  # the right token, a failing gateway
        assert seen[-1] == "jupyterhub secret"
        token.write_text("rotated\n")  # read again at every listing
        assert await reason(lister(url, token)) == "auth"
        assert seen[-1] == "jupyterhub rotated"
        assert await reason(lister(f"{url}/web", token)) == "decode"  # some other web server
        assert await reason(lister(f"{url}/elsewhere", token)) == "http"  # 404
        token.unlink()
        assert await reason(lister(url, token)) == "credentials"
    finally:
        await runner.cleanup()


async def test_lister_answers_are_bounded_by_the_timeout(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("secret")

    async def hang(request: web.Request) -> web.Response:
        await asyncio.sleep(30)
        return web.json_response({})

    app = web.Application()
    app.router.add_get("/api/v1/clusters/", hang)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        slow = GatewayLister(
            f"http://127.0.0.1:{port}", proxy_address=None, auth="basic", user="u",
            token_file=str(token), timeout=0.2,
        )  # fmt: skip
        assert await reason(slow) == "timeout"
    finally:
        await runner.cleanup()


async def test_a_cluster_whose_credentials_do_not_load_is_skipped_alone() -> None:
    """Real credential loading (dask-gateway's GatewaySecurity, a real SchedulerSource) on a
    certificate that is not one: that cluster is skipped and counted, the other exported."""
    from dask_gateway.client import GatewaySecurity

    from dask_memory_exporter.scheduler import SchedulerSource

    stand_in = Sources()

    def make(entry: ClusterEntry) -> Any:
        if entry.name == "bad":
            broken = GatewaySecurity(tls_key="not a key", tls_cert="not a cert")
            return SchedulerSource(entry.address, broken, 1.0)
        return stand_in(entry)

    p = gateway_poller(Lister("good", "bad"), stand_in)
    p.make_source = make
    for _ in range(2):
        p._list_at = 0.0
        snap = await p.poll_once()
    assert snap is not None
    assert workers(snap) == {"good": ["tcp://good:1"]}
    assert snap.source_gauges[GATEWAY_UNUSABLE_CLUSTERS] == 1.0
    assert snap.source_gauges[GATEWAY_CLUSTERS] == 1.0
    await p.close()
