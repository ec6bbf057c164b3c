"""Test support: ``dask-memory-exporter demo`` as a subprocess, stopped and reaped on exit."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def run_demo(port: int, log: Path, *args: str) -> Iterator[subprocess.Popen[bytes]]:
    """The demo serving on 127.0.0.1:``port`` with extra ``args``, its output in ``log``.

    On exit: SIGTERM (the demo's clean shutdown), kill after 30 s, and any worker process its
    shutdown left behind is killed too, so no test leaves a process running.
    """
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dask_memory_exporter",
                "demo",
                "--listen",
                f"127.0.0.1:{port}",
                *args,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
    children: list[psutil.Process] = []
    try:
        yield proc
    finally:
        with contextlib.suppress(psutil.Error):
            children = psutil.Process(proc.pid).children(recursive=True)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        _, alive = psutil.wait_procs(children, timeout=10)
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.kill()
