"""How long ``diagnose``'s worker actions hold a worker's event loop.

``Client.run`` calls ``worker_actions.collect_garbage`` and ``trim_allocator`` on the worker's
event loop, so their duration is how long the worker stops answering (heartbeats, transfers).
``gc.collect()`` costs time per *live tracked object* (it walks them all), ``malloc_trim(0)``
per free page it hands back. Each scenario runs in a fresh spawned process, as a worker is:

    .venv/bin/python -m benchmarks.diagnose_actions

Not a test: nothing here asserts; the figures are recorded in docs/runbooks.md.
"""

from __future__ import annotations

import multiprocessing
import sys
import time
from typing import Any

from dask_memory_exporter import worker_actions

MIB = 2**20

SCENARIOS: list[tuple[str, int, int]] = [
    # (label, live tracked objects, MiB of freed small objects left fragmented)
    ("idle", 0, 0),
    ("1M live objects", 1_000_000, 0),
    ("5M live objects", 5_000_000, 0),
    ("256 MiB fragmented", 0, 256),
    ("1 GiB fragmented", 0, 1024),
    ("5M live objects + 1 GiB fragmented", 5_000_000, 1024),
]


def _scenario(live: int, fragmented_mib: int) -> dict[str, Any]:
    keep = [{"i": i} for i in range(live)]  # tracked by gc: what a full collection walks
    kept = []
    if fragmented_mib:
        objects = [bytes(2048) for _ in range(fragmented_mib * MIB // 2048)]
        kept = objects[::64]
        del objects
    t0 = time.perf_counter()
    gc_result = worker_actions.collect_garbage()
    t1 = time.perf_counter()
    trim_result = worker_actions.trim_allocator()
    t2 = time.perf_counter()
    del keep, kept
    return {
        "gc_seconds": t1 - t0,
        "trim_seconds": t2 - t1,
        "rss_before": gc_result["rss_before"],
        "trim_freed": trim_result.get("rss_before", 0) - trim_result.get("rss_after", 0),
    }


def main() -> None:
    ctx = multiprocessing.get_context("spawn")
    print(f"Python {sys.version.split()[0]}")
    print("| scenario | RSS before | gc.collect() | malloc_trim(0) | trim freed |")
    print("|---|---|---|---|---|")
    for label, live, frag in SCENARIOS:
        with ctx.Pool(1) as pool:
            r = pool.apply(_scenario, (live, frag))
        print(
            f"| {label} | {r['rss_before'] / MIB:.0f} MiB | {r['gc_seconds'] * 1e3:.0f} ms "
            f"| {r['trim_seconds'] * 1e3:.0f} ms | {r['trim_freed'] / MIB:.0f} MiB |"
        )


if __name__ == "__main__":
    main()
