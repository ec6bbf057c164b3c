"""The pure parts of exporter/server.py: the log rate limit and the connection cap."""

from __future__ import annotations

import errno
import logging

from aiohttp.http_exceptions import LineTooLong

from dask_memory_exporter.server import BACKLOG, FD_RESERVE, RateLimitFilter, connection_cap


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _record(
    msg: str, exc: BaseException | None = None, level: int = logging.ERROR
) -> logging.LogRecord:
    exc_info = (type(exc), exc, None) if exc is not None else None
    return logging.LogRecord("aiohttp.server", level, __file__, 1, msg, ("127.0.0.1",), exc_info)


def test_one_line_per_kind_per_interval_with_the_count_suppressed() -> None:
    clock = Clock()
    f = RateLimitFilter(interval=60, clock=clock)
    exc = LineTooLong("header", "8190")
    assert f.filter(_record("Error handling request from %s", exc))
    assert not any(f.filter(_record("Error handling request from %s", exc)) for _ in range(99))
    # Another kind (another exception type) is not held back by the first.
    assert f.filter(_record("Error handling request from %s", OSError(errno.EMFILE, "x")))
    clock.now = 61
    r = _record("Error handling request from %s", exc)
    assert f.filter(r)
    assert r.getMessage().endswith("(99 similar suppressed)")


def test_client_errors_lose_their_traceback_and_become_warnings() -> None:
    f = RateLimitFilter(clock=Clock())
    r = _record("Error handling request from %s", LineTooLong("header", "8190"))
    assert f.filter(r)
    assert r.exc_info is None and r.levelno == logging.WARNING
    assert r.getMessage().startswith("Error handling request from 127.0.0.1: LineTooLong: ")


def test_our_own_bugs_keep_their_traceback() -> None:
    f = RateLimitFilter(clock=Clock())
    r = _record("Error handling request from %s", ZeroDivisionError("bug"))
    assert f.filter(r)
    assert r.exc_info is not None and r.levelno == logging.ERROR


def test_connection_cap_leaves_room_for_the_reserve_and_one_accept_burst() -> None:
    assert connection_cap(512, 1_048_576) == 512
    assert connection_cap(512, 1024) == 512
    assert connection_cap(2000, 1024) == 1024 - FD_RESERVE - BACKLOG
    assert connection_cap(512, 256) == 256 - FD_RESERVE - BACKLOG
    assert connection_cap(512, 100) == 1
