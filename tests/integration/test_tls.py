"""A tls:// scheduler with certificates: the exporter connects with Dask's Security."""

from __future__ import annotations

from pathlib import Path

from distributed import Scheduler, Worker
from distributed.security import Security

from dask_memory_exporter import names as n
from tests.support.live import by_worker_name, free_port, scalar, serve_exporter, source_errors


async def test_tls_scheduler(tmp_path: Path) -> None:
    sec = Security.temporary()  # a real self-signed CA, cert and key (needs cryptography)
    files = {}
    for name, pem in (
        ("ca", sec.tls_ca_file),
        ("cert", sec.tls_scheduler_cert),
        ("key", sec.tls_scheduler_key),
    ):
        path = tmp_path / f"{name}.pem"
        path.write_text(pem)
        files[name] = str(path)
    port = free_port()
    address = f"tls://127.0.0.1:{port}"
    scheduler = await Scheduler(
        host="127.0.0.1", port=port, protocol="tls", security=sec, dashboard=False
    )
    worker = await Worker(address, name="tls-worker", security=sec, nthreads=1, host="127.0.0.1")
    try:
        async with serve_exporter(
            scheduler=address, tls_ca_file=files["ca"], tls_cert=files["cert"], tls_key=files["key"]
        ) as ex:
            s = await ex.wait_for(
                lambda s: "tls-worker" in by_worker_name(s, n.WORKER_PROCESS_BYTES),
                what="the worker over TLS",
            )
            assert scalar(s, n.SCHEDULER_UP) == 1
        # Without certificates the TLS handshake fails: reported, not crashed.
        async with serve_exporter(scheduler=address, timeout=2.0, max_backoff=1.0) as ex:
            s = await ex.wait_for(lambda s: source_errors(s) >= 1, what="a failure")
            assert scalar(s, n.SCHEDULER_UP) == 0
    finally:
        await worker.close()
        await scheduler.close()
