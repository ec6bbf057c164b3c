"""A LocalCluster the way the suite starts them: loopback only, free ports, quiet.

Every address on 127.0.0.1 and every port chosen by the system (other processes here may hold
8786/8787), worker processes spawned by nannies, one thread each: memory figures are those of
real processes, and tests that run side by side never collide.
"""

from __future__ import annotations

import logging
from typing import Any

from distributed import LocalCluster

LOOPBACK: dict[str, Any] = {
    "threads_per_worker": 1,
    "processes": True,
    "host": "127.0.0.1",
    "scheduler_port": 0,
    "dashboard_address": "127.0.0.1:0",
    "worker_dashboard_address": "127.0.0.1:0",
    "asynchronous": True,
    "silence_logs": logging.ERROR,
}


async def loopback_cluster(memory_limit: int, n_workers: int = 0, **overrides: Any) -> LocalCluster:
    """Start an asynchronous LocalCluster of ``n_workers`` nanny-spawned worker processes.

    ``n_workers=0`` leaves the spec empty for the caller to add named workers to.
    """
    options = {**LOOPBACK, "n_workers": n_workers, "memory_limit": memory_limit, **overrides}
    return await LocalCluster(**options)
