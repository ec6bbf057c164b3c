"""The landing page's picture: each worker's memory drawn as the Dask dashboard draws it.

One horizontal bar per worker, stacked like Dask's "Bytes stored per worker" plot
(``WorkersMemory`` in ``distributed/dashboard/components/scheduler.py``): managed, unmanaged
(old) and unmanaged recent in one colour at three strengths, spilled in grey beside them, on an
axis shared by every worker (up to the largest limit, or further if a worker is past it). The
colour follows Dask's ``MemoryColor``: blue, orange once process memory passes the target (or
spill) threshold, red once it passes terminate (or the limit) or the worker is not running
(paused). On top of Dask's plot: ticks above and below each bar at the target, spill, pause and
terminate thresholds and at the limit, and a first bar for the cluster total (Dask's
``ClusterMemory``) with the same ticks at the fractions of the summed limits.

Pure: plain numbers in, an SVG string out, no clock and no I/O. Server-rendered, with no script
and no external resource, so the page keeps its strict Content-Security-Policy; the page's meta
refresh redraws it. Coordinates are whole pixels and every rectangle is drawn with crisp edges,
so a screenshot shows each part exactly as wide as the figures make it (the Chromium test of the
landing page measures them).
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from .snapshot import Snapshot

__all__ = [
    "BAR_HEIGHT",
    "BAR_WIDTH",
    "LABEL_WIDTH",
    "MARK_COLOURS",
    "PARTS",
    "ROW_HEIGHT",
    "SPILLED_FILL",
    "TRACK_FILL",
    "Bar",
    "Layout",
    "bars_from_snapshot",
    "fill",
    "layout",
    "level",
    "render",
    "render_snapshot",
]

# Geometry, in CSS pixels.
LABEL_WIDTH = 200  # worker names, right-aligned before the bars
BAR_WIDTH = 600  # the whole axis: from 0 to the largest limit (or past it)
TEXT_WIDTH = 330  # the figures after the bars
ROW_HEIGHT = 36
BAR_TOP = 11  # the bar's offset within its row
BAR_HEIGHT = 14
TICK = 6  # tick length above and below the bar
LEGEND_HEIGHT = 26

# Dask's colours (MemoryColor) and alphas (1, 0.7, 0.4 for managed, unmanaged, recent),
# blended over the white page here so that every part has one exact opaque colour.
BASE = {"blue": (0, 0, 255), "orange": (255, 165, 0), "red": (255, 0, 0)}
ALPHAS = {"managed": 1.0, "unmanaged_old": 0.7, "unmanaged_recent": 0.4}
PARTS = ("managed", "unmanaged_old", "unmanaged_recent", "spilled")
PART_TITLES = {
    "managed": "managed",
    "unmanaged_old": "unmanaged (old)",
    "unmanaged_recent": "unmanaged recent",
    "spilled": "spilled to disk",
}
SPILLED_FILL = "#808080"  # Dask's "grey"
TRACK_FILL = "#efefef"  # the empty rest of the axis
MARK_COLOURS = {
    "target": "#2ca02c",
    "spill": "#9467bd",
    "pause": "#d62728",
    "terminate": "#000000",
    "limit": "#8c564b",
}

MiB = 2**20


@dataclass(frozen=True, slots=True)
class Bar:
    """One bar: a worker, or the cluster total. Bytes; ``limit`` None when there is none."""

    label: str
    detail: str  # the tooltip: the worker's address, or the number of workers
    managed: int
    unmanaged_old: int
    unmanaged_recent: int
    spilled: int
    limit: int | None
    status: str = "running"  # Dask's worker status: "paused", "closing_gracefully", ...

    @property
    def running(self) -> bool:
        return self.status == "running"

    @property
    def process(self) -> int:
        return self.managed + self.unmanaged_old + self.unmanaged_recent

    def part(self, name: str) -> int:
        return int(getattr(self, name))


@dataclass(frozen=True, slots=True)
class Layout:
    """Where one bar's parts and ticks are, in pixels relative to its row's bar origin."""

    scale: float  # bytes per pixel
    parts: tuple[tuple[str, int, int], ...]  # (part, x start, x end), zero-width parts left out
    marks: tuple[tuple[str, int], ...]  # (threshold or "limit", x)


def blend(rgb: tuple[int, int, int], alpha: float) -> str:
    """``rgb`` at ``alpha`` over white, as #rrggbb."""
    r, g, b = (round(255 - alpha * (255 - c)) for c in rgb)
    return f"#{r:02x}{g:02x}{b:02x}"


def fill(part: str, colour: str) -> str:
    """The fill of ``part`` ("managed", ...) of a bar whose level is ``colour``."""
    if part == "spilled":
        return SPILLED_FILL
    return blend(BASE[colour], ALPHAS[part])


def level(bar: Bar, thresholds: Mapping[str, float]) -> str:
    """Dask's MemoryColor: "blue", "orange" past target (or spill), "red" past terminate
    (at most the limit) or when the worker is not running."""
    if not bar.running:
        return "red"
    if not bar.limit:
        return "blue"
    orange = min(thresholds.get("target", math.inf), thresholds.get("spill", math.inf))
    red = min(thresholds.get("terminate", math.inf), 1.0)
    if bar.process >= bar.limit * red:
        return "red"
    if bar.process >= bar.limit * orange:
        return "orange"
    return "blue"


def axis_end(bars: Iterable[Bar]) -> int:
    """The bytes at the right end of a shared axis, as Dask's ``max_limit`` (at least 1)."""
    return max([1, *(max(b.limit or 0, b.process + b.spilled) for b in bars)])


def layout(bar: Bar, end: int, thresholds: Mapping[str, float]) -> Layout:
    """Pixel positions of ``bar``'s parts and ticks on an axis from 0 to ``end`` bytes.

    Edges are rounded from the running sum, so adjacent parts share an edge (no gap, no
    overlap) and each part is within one pixel of its exact width.
    """
    scale = end / BAR_WIDTH

    def px(v: float) -> int:
        return min(BAR_WIDTH, round(v / scale))

    parts = []
    start = 0
    for name in PARTS:
        stop = start + bar.part(name)
        x0, x1 = px(start), px(stop)
        if x1 > x0:
            parts.append((name, x0, x1))
        start = stop
    marks: list[tuple[str, int]] = []
    if bar.limit:
        marks = [(t, px(bar.limit * f)) for t, f in thresholds.items() if t in MARK_COLOURS]
        marks.append(("limit", px(bar.limit)))
    return Layout(scale=scale, parts=tuple(parts), marks=tuple(marks))


def _mib(v: float) -> str:
    return f"{v / MiB:,.1f} MiB"


def _figures(bar: Bar) -> str:
    text = _mib(bar.process)
    if bar.limit:
        text += f" of {_mib(bar.limit)} ({bar.process / bar.limit:.0%})"
    if bar.spilled:
        text += f", {_mib(bar.spilled)} spilled"
    if not bar.running:
        text += f", {bar.status}"
    return text


def _clip(label: str, n: int = 26) -> str:
    return label if len(label) <= n else label[: n - 1] + "…"


def _row(bar: Bar, y: int, end: int, thresholds: Mapping[str, float]) -> list[str]:
    esc = html.escape
    geo = layout(bar, end, thresholds)
    colour = level(bar, thresholds)
    x0, top = LABEL_WIDTH, y + BAR_TOP
    out = [
        f'<g class="bar" data-label="{esc(bar.label)}">',
        f'<text x="{x0 - 8}" y="{top + BAR_HEIGHT - 2}" text-anchor="end">'
        f"<title>{esc(bar.detail)}</title>{esc(_clip(bar.label))}</text>",
        f'<rect x="{x0}" y="{top}" width="{BAR_WIDTH}" height="{BAR_HEIGHT}" '
        f'fill="{TRACK_FILL}"/>',
    ]
    for name, a, b in geo.parts:
        out.append(
            f'<rect class="{name}" x="{x0 + a}" y="{top}" width="{b - a}" '
            f'height="{BAR_HEIGHT}" fill="{fill(name, colour)}">'
            f"<title>{PART_TITLES[name]}: {_mib(bar.part(name))}</title></rect>"
        )
    for name, x in geo.marks:
        for y1 in (top - TICK - 1, top + BAR_HEIGHT + 1):
            out.append(
                f'<rect class="mark {name}" x="{x0 + x - 1}" y="{y1}" width="2" '
                f'height="{TICK}" fill="{MARK_COLOURS[name]}"><title>{name}</title></rect>'
            )
    out.append(
        f'<text x="{x0 + BAR_WIDTH + 10}" y="{top + BAR_HEIGHT - 2}">{esc(_figures(bar))}</text>'
    )
    out.append("</g>")
    return out


def _legend(thresholds: Mapping[str, float]) -> list[str]:
    items = [(fill(p, "blue"), PART_TITLES[p]) for p in PARTS]
    marks = [(MARK_COLOURS[t], f"{t} {f:.0%}") for t, f in thresholds.items() if t in MARK_COLOURS]
    out, x = [], 0
    for colour, text in items:
        out.append(f'<rect x="{x}" y="6" width="12" height="12" fill="{colour}"/>')
        out.append(f'<text x="{x + 16}" y="16">{html.escape(text)}</text>')
        x += 26 + 8 * len(text)
    for colour, text in [*marks, (MARK_COLOURS["limit"], "limit")]:
        out.append(f'<rect x="{x}" y="4" width="2" height="16" fill="{colour}"/>')
        out.append(f'<text x="{x + 6}" y="16">{html.escape(text)}</text>')
        x += 20 + 8 * len(text)
    return out


def render(workers: Sequence[Bar], thresholds: Mapping[str, float]) -> str:
    """The picture: a legend, the cluster total, then one bar per worker in the given order.

    The cluster bar has its own axis (its summed limits); the workers share one.
    """
    total = cluster_bar(workers)
    width = LABEL_WIDTH + BAR_WIDTH + TEXT_WIDTH
    height = LEGEND_HEIGHT + ROW_HEIGHT * (len(workers) + 1) + 8
    body = _legend(thresholds)
    body += _row(total, LEGEND_HEIGHT, axis_end([total]), thresholds)
    end = axis_end(workers)
    for i, bar in enumerate(workers):
        body += _row(bar, LEGEND_HEIGHT + ROW_HEIGHT * (i + 1) + 8, end, thresholds)
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" class="memory" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" shape-rendering="crispEdges" '
        f'font-family="sans-serif" font-size="12" role="img" '
        f'aria-label="Memory per worker: managed, unmanaged, unmanaged recent, spilled">'
        + "".join(body)
        + "</svg>"
    )


def cluster_bar(workers: Sequence[Bar]) -> Bar:
    """The sum of every worker, as Dask's ClusterMemory; a limit only if every worker has one."""
    limits = [w.limit for w in workers]
    return Bar(
        label="cluster",
        detail=f"{len(workers)} workers",
        managed=sum(w.managed for w in workers),
        unmanaged_old=sum(w.unmanaged_old for w in workers),
        unmanaged_recent=sum(w.unmanaged_recent for w in workers),
        spilled=sum(w.spilled for w in workers),
        limit=sum(x for x in limits if x) if limits and all(limits) else None,
    )


def bars_from_snapshot(snap: Snapshot) -> list[Bar]:
    """One bar per worker of ``snap``, sorted by name as the landing page's table is."""
    return [
        Bar(
            label=w.info.name,
            detail=w.info.address,
            managed=w.memory.managed,
            unmanaged_old=w.memory.unmanaged_old,
            unmanaged_recent=w.memory.unmanaged_recent,
            spilled=w.memory.spilled,
            limit=w.info.memory_limit,
            status=w.info.status,
        )
        for w in sorted(snap.workers, key=lambda w: w.info.name)
    ]


def render_snapshot(snap: Snapshot) -> str:
    """The picture of ``snap``'s workers with its thresholds."""
    return render(bars_from_snapshot(snap), snap.thresholds)
