"""The landing page's picture, as a browser shows it: bar sizes in a screenshot match /metrics.

A real LocalCluster (worker processes: one holding a little managed data, one holding more than
its target so that it spills), the exporter serving it over HTTP, and headless Chromium taking
a screenshot of ``/``. The screenshot is then measured: each bar is found by its colours, every
part's width in pixels is compared with the bytes /metrics reports for it (on the axis the
picture promises: the largest limit, or further), and each threshold tick with the limit times
the threshold. The exporter polls only every 20 s, and the metrics are read before and after
the screenshot: a pair with the same poll count proves the page showed those very figures.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from distributed import Client, Future, LocalCluster, wait
from PIL import Image

from dask_memory_exporter import names as n
from dask_memory_exporter import picture as p
from tests.support.browser import screenshot
from tests.support.cluster import loopback_cluster
from tests.support.live import Exporter, Samples, by_worker_name, scalar, serve_exporter

MiB = 2**20
LIMIT = 500 * MiB
THRESHOLDS = {"target": 0.6, "spill": 0.7, "pause": 0.8, "terminate": 0.95}
PART_METRICS = {
    "managed": n.WORKER_MANAGED_BYTES,
    "unmanaged_old": n.WORKER_UNMANAGED_BYTES,
    "unmanaged_recent": n.WORKER_UNMANAGED_RECENT_BYTES,
    "spilled": n.WORKER_SPILLED_BYTES,
}
TOLERANCE = 2  # pixels: one for the rounding of each edge
# Polls this far apart leave room for a screenshot between two, even on a loaded machine.
POLL_INTERVAL = 20
RGB = tuple[int, int, int]


def rgb(hex_colour: str) -> RGB:
    return (int(hex_colour[1:3], 16), int(hex_colour[3:5], 16), int(hex_colour[5:7], 16))


# Every colour a bar can have, mapped back to (part, level); the empty track; the ticks.
PART_OF = {rgb(p.fill(part, lvl)): (part, lvl) for part in p.PARTS for lvl in p.BASE}
TRACK = rgb(p.TRACK_FILL)
MARK_OF = {rgb(c): name for name, c in p.MARK_COLOURS.items()}


class Live:
    def __init__(self, cluster: LocalCluster, exporter: Exporter) -> None:
        self.cluster = cluster
        self.exporter = exporter


@pytest_asyncio.fixture
async def live() -> AsyncIterator[Live]:
    cluster = await loopback_cluster(LIMIT, n_workers=2)
    try:
        async with Client(cluster, asynchronous=True) as client:
            await client.wait_for_workers(2)
            names = {addr: str(ws.name) for addr, ws in cluster.scheduler.workers.items()}
            a, b = sorted(names, key=names.__getitem__)
            # random bytes (spilled to disk at their full size), a few at a time and never
            # gathered: the data stays on the workers, b's beyond its target is spilled
            held: list[Future[bytes]] = []
            for worker, blocks in ((a, 6), (b, 40)):
                for _ in range(0, blocks, 2):
                    batch = [
                        client.submit(os.urandom, 10 * MiB, workers=[worker], pure=False)
                        for _ in range(2)
                    ]
                    await wait(batch)
                    held += batch
            async with serve_exporter(
                scheduler=cluster.scheduler_address, poll_interval=f"{POLL_INTERVAL}s", **THRESHOLDS
            ) as exporter:
                yield Live(cluster, exporter)
    finally:
        await cluster.close()  # type: ignore[misc]


def bars_from_metrics(s: Samples) -> list[p.Bar]:
    """The bars the page must show, rebuilt from /metrics alone (workers sorted by name)."""
    parts = {part: by_worker_name(s, metric) for part, metric in PART_METRICS.items()}
    limits = by_worker_name(s, n.WORKER_LIMIT_BYTES)
    paused = by_worker_name(s, n.WORKER_PAUSED)
    return [
        p.Bar(
            name,
            "",
            *(int(parts[part][name]) for part in p.PARTS),
            int(limits[name]),
            status="paused" if paused[name] else "running",
        )
        for name in sorted(limits)
    ]


def find_bars(img: Image.Image) -> list[tuple[int, int]]:
    """(left x, middle y) of every bar: a run of exactly BAR_WIDTH bar-coloured pixels."""
    px = img.load()
    assert px is not None
    bar_colours = {*PART_OF, TRACK}
    width, height = img.size
    rows: list[tuple[int, int]] = []
    for y in range(height):
        run_start, x = None, 0
        while x < width:
            inside = px[x, y][:3] in bar_colours
            if inside and run_start is None:
                run_start = x
            if (not inside or x == width - 1) and run_start is not None:
                if x - run_start == p.BAR_WIDTH:
                    rows.append((run_start, y))
                run_start = None
            x += 1
    bands: list[list[tuple[int, int]]] = []
    for left, y in rows:
        if bands and bands[-1][-1][1] == y - 1 and bands[-1][-1][0] == left:
            bands[-1].append((left, y))
        else:
            bands.append([(left, y)])
    assert all(len(band) == p.BAR_HEIGHT for band in bands), [len(b) for b in bands]
    return [(band[0][0], band[len(band) // 2][1]) for band in bands]


def measure(img: Image.Image, left: int, y: int) -> tuple[dict[str, int], set[str], dict[str, int]]:
    """Widths of each part along the bar's middle line, the levels seen, and the ticks' x."""
    px = img.load()
    assert px is not None
    widths: dict[str, int] = {}
    levels: set[str] = set()
    for x in range(left, left + p.BAR_WIDTH):
        colour = px[x, y][:3]
        if colour in PART_OF:
            part, lvl = PART_OF[colour]
            widths[part] = widths.get(part, 0) + 1
            if part != "spilled":
                levels.add(lvl)
    marks: dict[str, int] = {}
    tick_y = y - p.BAR_HEIGHT // 2 - p.TICK // 2 - 1  # through the ticks above the bar
    for x in range(left - 2, left + p.BAR_WIDTH + 2):
        name = MARK_OF.get(px[x, tick_y][:3])
        if name is not None and name not in marks:
            marks[name] = x - left + 1  # ticks are 2 px wide, centred on the position
    return widths, levels, marks


def check_bar(img: Image.Image, left: int, y: int, bar: p.Bar, end: int) -> None:
    widths, levels, marks = measure(img, left, y)
    scale = end / p.BAR_WIDTH
    for part in p.PARTS:
        expected = bar.part(part) / scale
        assert abs(widths.get(part, 0) - expected) <= TOLERANCE, (bar.label, part, widths)
    if bar.process:
        assert levels == {p.level(bar, THRESHOLDS)}, (bar.label, levels)
    assert bar.limit is not None
    expected_marks = {t: bar.limit * f / scale for t, f in THRESHOLDS.items()}
    expected_marks["limit"] = bar.limit / scale
    assert set(marks) == set(expected_marks), (bar.label, marks)
    for name, x in marks.items():
        assert abs(x - expected_marks[name]) <= TOLERANCE, (bar.label, name, marks)


@pytest.mark.timeout(600)
async def test_bars_in_a_screenshot_match_the_metrics(live: Live, tmp_path: Path) -> None:
    exporter = live.exporter

    def ready(s: Samples) -> bool:
        spilled = by_worker_name(s, n.WORKER_SPILLED_BYTES)
        managed = by_worker_name(s, n.WORKER_MANAGED_BYTES)
        return len(managed) == 2 and min(managed.values()) > 0 and max(spilled.values()) > 0

    await exporter.wait_for(ready, timeout=120, what="managed data on both, spilled on one")
    deadline = time.monotonic() + 300
    shot = tmp_path / "landing.png"
    while True:  # until a screenshot falls between two polls
        before = await exporter.scrape()
        await asyncio.to_thread(screenshot, exporter.url + "/", shot)
        after = await exporter.scrape()
        polls = scalar(before, n.EXPORTER_POLLS_TOTAL)
        if polls == scalar(after, n.EXPORTER_POLLS_TOTAL) and ready(before):
            break
        assert time.monotonic() < deadline, "no screenshot between two polls in 300 s"

    workers = bars_from_metrics(before)
    total = p.cluster_bar(workers)
    with Image.open(shot) as img:
        rgb_img = img.convert("RGB")
    found = find_bars(rgb_img)
    assert len(found) == 1 + len(workers), found  # the cluster, then each worker
    check_bar(rgb_img, *found[0], total, p.axis_end([total]))
    end = p.axis_end(workers)
    for (left, y), bar in zip(found[1:], workers, strict=True):
        check_bar(rgb_img, left, y, bar, end)
    # what the test set up is in the picture: managed data on both, spilled data on one
    assert all(b.managed for b in workers) and any(b.spilled for b in workers)
    # scheduler mode reads no RSS from the OS: the table has no column for it
    status, _, page = await exporter.get("/")
    assert status == 200 and b"RSS from the OS" not in page
