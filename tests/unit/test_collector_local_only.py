from dask_memory_exporter import names as n
from dask_memory_exporter.collector import Exposition
from dask_memory_exporter.memory import MemoryModel
from dask_memory_exporter.process import LocalProcess, LocalReading
from dask_memory_exporter.snapshot import Poller, Snapshot
from tests.support.live import parse


class Local:
    def read(self, workers=None):
        return LocalReading((LocalProcess(21, 1.0, 400 * 2**20, None, "w"),))


async def _publish(s: Snapshot) -> None:
    pass


async def test_local_only_renders_rss_only() -> None:
    p = Poller(
        None, MemoryModel(30), {"spill": 0.7}, _publish, local=Local(), local_workers_only=True
    )
    snap = await p.poll_once()
    samples = parse(Exposition.render(snap).text.decode())
    worker_series = {k for k in samples if k[0].startswith("dask_memory_worker_")}
    assert worker_series == {(n.WORKER_RSS_BYTES, (("worker", ""), ("worker_name", "w")))}
    assert (n.SCHEDULER_UP, ()) not in samples
