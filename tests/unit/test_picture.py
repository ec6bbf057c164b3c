"""The landing page's picture (exporter/picture.py): geometry, colours and the SVG it writes."""

from __future__ import annotations

import itertools
import xml.etree.ElementTree as ET

from dask_memory_exporter import picture as p
from dask_memory_exporter.memory import MemoryBreakdown
from dask_memory_exporter.snapshot import Snapshot, WorkerSnapshot
from tests.support.workers import MiB, info

THRESHOLDS = {"target": 0.6, "spill": 0.7, "pause": 0.8, "terminate": 0.95}
SVG = "{http://www.w3.org/2000/svg}"


def bar(
    managed: int = 0,
    old: int = 0,
    recent: int = 0,
    spilled: int = 0,
    limit: int | None = 400 * MiB,
    *,
    label: str = "w",
    status: str = "running",
) -> p.Bar:
    return p.Bar(label, "tcp://127.0.0.1:1", managed, old, recent, spilled, limit, status)


def test_parts_are_stacked_in_dask_order_and_sized_by_bytes() -> None:
    b = bar(100 * MiB, 50 * MiB, 30 * MiB, 20 * MiB)
    geo = p.layout(b, 600 * MiB, THRESHOLDS)  # 1 MiB per pixel
    assert geo.scale == MiB
    assert geo.parts == (
        ("managed", 0, 100),
        ("unmanaged_old", 100, 150),
        ("unmanaged_recent", 150, 180),
        ("spilled", 180, 200),
    )


def test_marks_at_each_threshold_and_the_limit() -> None:
    geo = p.layout(bar(limit=400 * MiB), 600 * MiB, THRESHOLDS)
    assert dict(geo.marks) == {
        "target": 240,
        "spill": 280,
        "pause": 320,
        "terminate": 380,
        "limit": 400,
    }
    # a disabled threshold (absent from the mapping) has no mark; no limit, no marks at all
    assert "pause" not in dict(p.layout(bar(), 600 * MiB, {"target": 0.6}).marks)
    assert p.layout(bar(limit=None), 600 * MiB, THRESHOLDS).marks == ()


def test_edges_are_shared_and_each_part_within_a_pixel() -> None:
    b = bar(333_333, 333_333, 333_334, 1)
    geo = p.layout(b, 1_000_001 * 3, THRESHOLDS)
    edges = [(a, z) for _, a, z in geo.parts]
    assert all(z0 == a1 for (_, z0), (a1, _) in itertools.pairwise(edges))
    for name, a, z in geo.parts:
        assert abs((z - a) - b.part(name) / geo.scale) <= 1
    assert all(z > a for _, a, z in geo.parts)  # zero-width parts are left out
    assert "spilled" not in {n for n, _, _ in geo.parts}


def test_shared_axis_ends_at_the_largest_limit_or_past_it() -> None:
    assert p.axis_end([bar(limit=400 * MiB), bar(limit=300 * MiB)]) == 400 * MiB
    over = bar(300 * MiB, 100 * MiB, 0, 50 * MiB, limit=400 * MiB)
    assert p.axis_end([over]) == 450 * MiB
    assert p.axis_end([bar(limit=None)]) == 1  # nothing to draw: no division by zero
    # a bar never runs past the axis
    assert p.layout(over, p.axis_end([over]), THRESHOLDS).parts[-1][2] == p.BAR_WIDTH


def test_colour_follows_dask_memory_color() -> None:
    assert p.level(bar(100 * MiB), THRESHOLDS) == "blue"
    assert p.level(bar(240 * MiB), THRESHOLDS) == "orange"  # process at target
    assert p.level(bar(380 * MiB), THRESHOLDS) == "red"  # at terminate
    assert p.level(bar(100 * MiB, status="paused"), THRESHOLDS) == "red"  # paused
    assert p.level(bar(10**12, limit=None), THRESHOLDS) == "blue"
    assert p.level(bar(240 * MiB), {"spill": 0.7}) == "blue"  # target disabled: spill counts
    assert p.level(bar(400 * MiB), {}) == "red"  # no thresholds: red at the limit


def test_fills_are_dask_colours_blended_over_white() -> None:
    assert p.fill("managed", "blue") == "#0000ff"
    assert p.fill("unmanaged_old", "blue") == "#4c4cff"
    assert p.fill("unmanaged_recent", "orange") == "#ffdb99"
    assert p.fill("spilled", "red") == p.SPILLED_FILL
    fills = {p.fill(part, c) for part in p.PARTS for c in p.BASE}
    assert len(fills) == 3 * 3 + 1  # every part at every level tells apart


def test_cluster_bar_sums_workers_and_their_limits() -> None:
    a, b = bar(10, 20, 30, 40, limit=100), bar(1, 2, 3, 4, limit=200)
    total = p.cluster_bar([a, b])
    assert (total.managed, total.unmanaged_old, total.unmanaged_recent, total.spilled) == (
        11,
        22,
        33,
        44,
    )
    assert total.limit == 300
    assert p.cluster_bar([a, bar(limit=None)]).limit is None  # a sum without one would lie


def test_render_is_well_formed_svg_with_a_bar_per_worker_and_the_cluster() -> None:
    svg = p.render([bar(100 * MiB, label="a"), bar(10 * MiB, label="<b>&")], THRESHOLDS)
    root = ET.fromstring(svg)  # escaped names keep it well formed
    groups = [g.get("data-label") for g in root.iter(f"{SVG}g")]
    assert groups == ["cluster", "a", "<b>&"]
    assert root.get("shape-rendering") == "crispEdges"
    assert "script" not in svg and "href" not in svg  # nothing the CSP would refuse
    managed = [r for r in root.iter(f"{SVG}rect") if r.get("class") == "managed"]
    # the cluster: 110 MiB on an axis of 800 MiB; the workers: on one of 400 MiB
    assert [int(r.get("width", 0)) for r in managed] == [82, 150, 15]


def test_render_from_a_snapshot_sorted_by_name() -> None:
    def ws(name: str, managed: int) -> WorkerSnapshot:
        mem = MemoryBreakdown(process=200 * MiB, managed=managed, unmanaged_old=0, spilled=0)
        return WorkerSnapshot(info(f"tcp://127.0.0.1:10{len(name)}", name), mem)

    snap = Snapshot(time=0.0, workers=(ws("zz", 5 * MiB), ws("a", 7 * MiB)), thresholds=THRESHOLDS)
    bars = p.bars_from_snapshot(snap)
    assert [b.label for b in bars] == ["a", "zz"]
    assert bars[0].unmanaged_recent == 193 * MiB  # process - managed - old
    assert 'data-label="zz"' in p.render_snapshot(snap)
