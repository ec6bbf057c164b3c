"""/runbooks over real HTTP: where every alert's runbook_url points by default."""

from __future__ import annotations

from dask_memory_exporter.mixin import MixinConfig
from dask_memory_exporter.rules import add_runbook_links, alert_rules
from tests.support.live import free_port, serve_exporter


async def test_runbooks_served_with_each_alerts_section() -> None:
    # No scheduler at that address: the page does not depend on one.
    async with serve_exporter(scheduler=f"tcp://127.0.0.1:{free_port()}") as ex:
        status, headers, body = await ex.get("/runbooks")
        assert status == 200
        assert headers["Content-Type"].startswith("text/html")
        assert "default-src 'none'" in headers["Content-Security-Policy"]
        page = body.decode()
        config = MixinConfig()
        for rule in add_runbook_links(alert_rules(config), config.runbook_url_base):
            # the link, with {{ $labels.instance }} as Prometheus fills it in: this exporter
            url = rule["annotations"]["runbook_url"].replace(
                "{{ $labels.instance }}", ex.url.removeprefix("http://")
            )
            path, _, fragment = url.removeprefix(ex.url).partition("#")
            assert path == "/runbooks"
            assert f'id="{fragment}"' in page, rule["alert"]
        status, _, landing = await ex.get("/")
        assert status == 200 and b'href="/runbooks"' in landing
