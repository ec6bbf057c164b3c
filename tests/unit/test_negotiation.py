"""Accept and Accept-Encoding parsing (RFC 9110 quality values), no HTTP involved."""

from __future__ import annotations

import pytest

from dask_memory_exporter.negotiation import coding_qualities, wants_gzip, wants_openmetrics

PROMETHEUS_2_ACCEPT = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
    "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, False),
        ("", False),
        ("gzip", True),
        ("gzip, deflate, br", True),
        (" gzip , deflate", True),
        ("GZIP;Q=0.5", True),
        ("x-gzip", True),
        ("*", True),
        ("identity;q=0, gzip;q=0.2", True),
        ("gzip;q=0", False),
        ("gzip;q=0, identity", False),
        ("gzip;q=0.0", False),
        ("gzip;q=0.5, identity", False),  # identity preferred
        ("notgzip", False),
        ("gzipx", False),
        ("deflate", False),
        ("*;q=0, identity", False),
        ("gzip;q=abc", False),  # malformed element skipped
        ("gzip;q=2", False),  # out of range: skipped
        ("gzip;q=0, gzip", False),  # first quality wins
    ],
)
def test_wants_gzip(header: str | None, expected: bool) -> None:
    assert wants_gzip(header) is expected


def test_coding_qualities() -> None:
    assert coding_qualities("gzip;q=0.3, br, ,;q=1, x y, identity ; q = 0") == {
        "gzip": 0.3,
        "br": 1.0,
        "identity": 0.0,
    }


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, False),
        ("", False),
        ("application/openmetrics-text", True),
        ("application/openmetrics-text; version=1.0.0", True),
        ("application/*", True),
        (PROMETHEUS_2_ACCEPT, True),
        ("text/plain;q=0.5, application/openmetrics-text;q=0.8", True),
        ("application/openmetrics-text;q=0, text/plain", False),
        ("application/openmetrics-text;q=0.1, text/plain;q=0.9", False),
        ("text/plain", False),
        ("text/*", False),
        ("*/*", False),  # equal quality: the classic text format
        ("application/json", False),
        ("garbage;;;q=x, ,", False),
        ("application/openmetrics-text;q=abc, text/plain", False),
        ("garbage, application/openmetrics-text", True),  # a bad element is dropped only
    ],
)
def test_wants_openmetrics(header: str | None, expected: bool) -> None:
    assert wants_openmetrics(header) is expected
