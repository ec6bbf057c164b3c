"""Benchmark of the gateway mode's own cost: a round over many clusters, and its rendering.

Run: ``.venv/bin/python -m benchmarks.gateway_bench`` (well under a minute). It prints a
Markdown table; docs/dask-gateway.md records the results. Not a test: nothing asserts a time.

The same 1,000 workers are spread over 1, 10, 100 and 500 clusters. Each cluster's scheduler
is a stand-in that answers at once with its workers (the network and the schedulers are not
what is measured here: a real scheduler answers in its own time, which the budget bounds):

- round: ``GatewayPoller.poll_once`` with every cluster due (the Pollers' model updates and
  Snapshots, the merge), without rendering;
- render: both exposition formats plus gzip of the merged Snapshot, once per round, off the
  event loop in the exporter.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Mapping

from distributed.security import Security

from dask_memory_exporter.collector import Exposition
from dask_memory_exporter.gateway import ClusterEntry, GatewayPoller
from dask_memory_exporter.memory import WorkerReading
from dask_memory_exporter.names import Metric
from dask_memory_exporter.snapshot import Snapshot
from dask_memory_exporter.source import SourceResult, WorkerInfo

MiB = 2**20
WORKERS = 1000
THRESHOLDS = {"target": 0.6, "spill": 0.7, "pause": 0.8, "terminate": 0.95}


def workers(cluster: int, n: int) -> dict[str, WorkerInfo]:
    out = {}
    for i in range(n):
        address = f"tls://10.{cluster // 250}.{cluster % 250}.{i % 250}:{40000 + i}"
        out[address] = WorkerInfo(
            address=address,
            name=f"dask-worker-{cluster}-{i}",
            host="10.0.0.1",
            nthreads=2,
            memory_limit=4096 * MiB,
            status="running",
            last_seen=time.time(),
            nanny=None,
            reading=WorkerReading(
                process=(900 + i % 100) * MiB,
                managed_total=(300 + i % 50) * MiB,
                spilled_memory=0,
                spilled_disk=(i % 7) * MiB,
                heartbeat_time=time.time(),
            ),
        )
    return out


class Answering:
    """A scheduler source that answers at once with a fixed roster."""

    name = "scheduler"
    roster = True
    families: tuple[Metric, ...] = ()
    reasons: tuple[str, ...] = ()

    def __init__(self, roster: dict[str, WorkerInfo]) -> None:
        self.roster = True
        self.workers = roster

    async def fetch(self, known: Mapping[str, WorkerInfo]) -> SourceResult:
        return SourceResult(workers=self.workers)

    async def close(self) -> None:
        pass


class Lister:
    def __init__(self, n: int) -> None:
        self.entries = [
            ClusterEntry(f"{i:032x}", f"gateway://p:80/{i:032x}", Security()) for i in range(n)
        ]

    async def list(self) -> list[ClusterEntry]:
        return self.entries

    async def close(self) -> None:
        pass


async def measure(clusters: int, repeat: int) -> tuple[float, float, int]:
    per = WORKERS // clusters
    rosters = {f"{i:032x}": workers(i, per) for i in range(clusters)}

    async def publish(s: Snapshot) -> None:
        pass

    poller = GatewayPoller(
        Lister(clusters),
        lambda e: Answering(rosters[e.name]),
        30.0,
        THRESHOLDS,
        publish,
        list_interval=3600,
    )
    await poller.poll_once()  # lists, makes the Pollers
    rounds = []
    for _ in range(repeat):
        poller.due = dict.fromkeys(poller.due, 0.0)
        t = time.perf_counter()
        snap = await poller.poll_once()
        rounds.append(time.perf_counter() - t)
    assert snap is not None
    renders = []
    for _ in range(max(3, repeat // 3)):
        t = time.perf_counter()
        expo = Exposition.render(snap, process_metrics=False)
        renders.append(time.perf_counter() - t)
    await poller.close()
    return statistics.median(rounds) * 1000, statistics.median(renders) * 1000, len(expo.text)


async def main() -> None:
    print(f"| clusters x workers ({WORKERS} workers) | round ms | render ms | exposition KiB |")
    print("|---|---|---|---|")
    for clusters in (1, 10, 100, 500):
        round_ms, render_ms, size = await measure(clusters, repeat=15)
        per = WORKERS // clusters
        print(f"| {clusters} x {per} | {round_ms:.1f} | {render_ms:.1f} | {size / 1024:.0f} |")


if __name__ == "__main__":
    asyncio.run(main())
