"""The series budget: series per worker and bytes per scrape, by cardinality setting.

Run: ``.venv/bin/python -m benchmarks.cardinality`` (about a minute). Not a test. It renders
the real Exposition of a scheduler-mode Snapshot at 1,000 and 5,000 workers (copies of a real
worker entry taken from a live LocalCluster, four memory thresholds enabled, process metrics
on) and counts the samples and bytes of each format, for: every family (the default), a
deny list that drops the threshold lines, an allow list of the memory breakdown alone, and
``--cluster-totals-only``. docs/cardinality.md records the results.
"""

from __future__ import annotations

import asyncio
import platform
from datetime import datetime, timezone
from typing import Any

import psutil

from benchmarks.exporter_bench import identity_of, real_worker_entry
from dask_memory_exporter.collector import Exposition
from dask_memory_exporter.config import load_settings
from dask_memory_exporter.memory import MemoryModel
from dask_memory_exporter.scheduler import SchedulerSource, decode_identity
from dask_memory_exporter.snapshot import Poller, Snapshot
from dask_memory_exporter.source import SourceResult

MiB = 2**20
SETTINGS: dict[str, dict[str, Any]] = {
    "default (every family)": {},
    "`--metric-denylist dask_memory_worker_threshold_ratio`": {
        "metric_denylist": "dask_memory_worker_threshold_ratio"
    },
    "`--metric-allowlist` of the breakdown (process, managed, unmanaged, recent, spilled, limit)": {
        "metric_allowlist": "dask_memory_worker_(process|managed|unmanaged|unmanaged_recent"
        "|spilled|limit)_bytes,dask_memory_scheduler_.*"
    },
    "`--cluster-totals-only`": {"cluster_totals_only": True},
}


def snapshot(ident: dict[str, Any]) -> Snapshot:
    class Fixed:
        name = "scheduler"
        roster = True
        reasons: tuple[str, ...] = ()
        families = SchedulerSource.families

        async def fetch(self, workers: Any) -> SourceResult:
            poll = decode_identity(ident)
            return SourceResult(workers=poll.workers, skipped=poll.skipped, values=poll.values)

        async def close(self) -> None:
            pass

    async def publish(s: Snapshot) -> None:
        pass

    thresholds = {"target": 0.6, "spill": 0.7, "pause": 0.8, "terminate": 0.95}
    return asyncio.run(Poller([Fixed()], MemoryModel(30.0), thresholds, publish).poll_once())


def _size(b: int) -> str:
    return f"{b / MiB:.2f} MiB" if b >= MiB / 4 else f"{b / 1024:.1f} KiB"


def samples(body: bytes) -> int:
    return sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))


def main() -> None:
    entry = asyncio.run(real_worker_entry())
    rows = []
    for n in (1000, 5000):
        snap = snapshot(identity_of(entry, n, 0.0))
        for label, overrides in SETTINGS.items():
            s = load_settings({"scheduler": "tcp://127.0.0.1:8786", **overrides})
            expo = Exposition.render(
                snap, keep=s.metric_filter(), totals_only=s.cluster_totals_only
            )
            count = samples(expo.text)
            empty_expo = Exposition.render(
                snapshot(identity_of(entry, 0, 0.0)),
                keep=s.metric_filter(),
                totals_only=s.cluster_totals_only,
            )
            fixed = samples(empty_expo.text)
            rows.append(
                f"| {label} | {n:,} | {(count - fixed) / n:.0f} | {count:,} | "
                f"{_size(len(expo.text))} | {_size(len(expo.openmetrics))} | "
                f"{_size(len(expo.text_gzip))} |"
            )
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(
        f"Measured {when}, {platform.machine()}, Python {platform.python_version()}, "
        f"{psutil.cpu_count()} cores.\n"
    )
    print(
        "| setting | workers | series per worker | samples per scrape | text | OpenMetrics "
        "| text, gzip |\n|---|---|---|---|---|---|---|"
    )
    print("\n".join(rows))


if __name__ == "__main__":
    main()
