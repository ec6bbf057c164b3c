"""The alerting half of the live end-to-end tests: a webhook that records what Alertmanager
delivers, the committed Alertmanager example pointed at it, and rule timings short enough for a
1 s scrape and evaluation interval."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

from dask_memory_exporter.mixin import MixinConfig
from tests.support.promstack import free_port

ROOT = Path(__file__).resolve().parents[2]
ALERTMANAGER_CONFIG = ROOT / "deploy" / "alertmanager" / "alertmanager.yaml"

# Short windows and for: for a 1 s scrape/evaluation interval. The recent-window of the
# prediction stays shorter than its for: (as in the defaults), so a one-off step of unmanaged
# memory (e.g. the scheduler's sliding minimum pinned at 0 for one window) cannot fire it.
LIVE = dataclasses.replace(
    MixinConfig(),
    no_data_to_spill_for="2s",
    pause_predicted_window="15s",
    pause_predicted_recent_window="4s",
    pause_predicted_horizon="60s",
    pause_predicted_for="5s",
    paused_for="1s",
    near_termination_for="1s",
    unmanaged_growing_window="20s",
    unmanaged_growing_recent_window="5s",
    unmanaged_growing_horizon="120s",
    unmanaged_growing_for="6s",
    heartbeat_stale_after="15s",
    heartbeat_stale_for="2s",
    scheduler_down_for="5s",
    # Prometheus is up before the demo's exporter: keep the target-down alert at its default.
)
NO_DATA = "DaskWorkerMemoryHighNoDataToSpill"
PREDICTED = "DaskWorkerPausePredicted"
PAUSED = "DaskWorkerPaused"


@dataclasses.dataclass(frozen=True)
class Delivery:
    """One alert in one webhook notification."""

    at: float  # time.monotonic() on arrival
    receiver: str
    status: str
    labels: dict[str, str]

    @property
    def name(self) -> str:
        return self.labels.get("alertname", "")


class Webhook:
    """Alertmanager webhook receiver: ``POST /<receiver name>``."""

    def __init__(self) -> None:
        self.deliveries: list[Delivery] = []

    async def handle(self, request: web.Request) -> web.Response:
        payload = await request.json()
        now = time.monotonic()
        for alert in payload["alerts"]:
            self.deliveries.append(
                Delivery(now, request.match_info["receiver"], alert["status"], alert["labels"])
            )
        return web.Response(text="ok")

    def first(self, alertname: str, **labels: str) -> Delivery | None:
        for d in self.deliveries:
            if (
                d.status == "firing"
                and d.name == alertname
                and all(d.labels.get(k) == v for k, v in labels.items())
            ):
                return d
        return None


@contextlib.asynccontextmanager
async def webhook_receiver() -> AsyncIterator[tuple[Webhook, str]]:
    hook = Webhook()
    app = web.Application()
    app.router.add_post("/{receiver}", hook.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield hook, f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def live_alertmanager_config(webhook_url: str) -> str:
    """The committed example, receivers pointed at the test's webhook, timings shortened."""
    config: dict[str, Any] = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())
    for receiver in config["receivers"]:
        for hook in receiver.get("webhook_configs", []):
            hook["url"] = f"{webhook_url}/{receiver['name']}"
            hook["send_resolved"] = True
    shorten_timings(config["route"])
    return yaml.safe_dump(config, sort_keys=False)


def shorten_timings(route: dict[str, Any]) -> None:
    """Group and repeat timings of a route tree cut to test speed (1 s; no repeats)."""
    route.update(group_wait="1s", group_interval="1s", repeat_interval="1h")
    for child in route.get("routes", []):
        shorten_timings(child)
