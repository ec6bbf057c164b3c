"""Content negotiation for ``/metrics``: which format (``Accept``) and whether gzip
(``Accept-Encoding``), with the quality values of RFC 9110 §12.4.2 honoured.

``Accept`` is matched by python-mimeparse (specificity, parameters, ``q=0`` as "not
acceptable"); media ranges it cannot parse are dropped first, so one bad element never
decides the answer. ``Accept-Encoding`` is a list of content-coding tokens, which
mimeparse does not parse (it expects ``type/subtype``): the few lines below follow
§12.5.3 instead. No substring matching: ``notgzip`` is not ``gzip``.
"""

from __future__ import annotations

import mimeparse

__all__ = ["coding_qualities", "wants_gzip", "wants_openmetrics"]

OPENMETRICS = "application/openmetrics-text; version=1.0.0"
TEXT = "text/plain; version=0.0.4"
# On equal quality the later entry wins in mimeparse: the classic text format is the default.
_SUPPORTED = [OPENMETRICS, TEXT]


def wants_openmetrics(accept: str | None) -> bool:
    """Whether the client prefers OpenMetrics to the text format (absent header: no)."""
    ranges = [r for r in (accept or "").split(",") if _parses(r)]
    if not ranges:
        return False
    best: str = mimeparse.best_match(_SUPPORTED, ",".join(ranges))
    return best == OPENMETRICS


def _parses(media_range: str) -> bool:
    if not media_range.strip():
        return False
    try:
        mimeparse.parse_media_range(media_range)
        mimeparse.quality_parsed("*/*", [mimeparse.parse_media_range(media_range)])
    except (ValueError, mimeparse.MimeTypeParseException):
        return False
    return True


def coding_qualities(accept_encoding: str) -> dict[str, float]:
    """``{coding: q}`` from an Accept-Encoding value; malformed elements are skipped.

    Codings are case-insensitive; ``x-gzip`` is ``gzip`` (RFC 9110 §8.4.1.3). A coding
    listed twice keeps its first quality.
    """
    qualities: dict[str, float] = {}
    for element in accept_encoding.split(","):
        coding, *params = (p.strip() for p in element.split(";"))
        coding = coding.lower()
        if not coding or not all(c.isalnum() or c in "!#$%&'*+-.^_`|~" for c in coding):
            continue
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value.strip())
                except ValueError:
                    q = -1.0
        if not 0.0 <= q <= 1.0:
            continue
        qualities.setdefault("gzip" if coding == "x-gzip" else coding, q)
    return qualities


def wants_gzip(accept_encoding: str | None) -> bool:
    """Whether to gzip: gzip (or ``*``) acceptable with q > 0 and not below identity's q.

    Unlisted, identity is always acceptable but least preferred (§12.5.3): ``gzip;q=0.5``
    gets gzip, ``gzip;q=0.5, identity`` does not.
    """
    if not accept_encoding:
        return False
    q = coding_qualities(accept_encoding)
    star = q.get("*")
    gzip_q = q.get("gzip", star if star is not None else 0.0)
    identity_q = q.get("identity", star if star is not None else 0.0)
    return gzip_q > 0 and gzip_q >= identity_q
