"""The runbooks, served by the exporter at ``/runbooks``: where the alerts' links land.

Every alert's ``runbook_url`` is ``{runbook_url_base}#{alert name in lower case}``
(``MixinConfig.runbook_url_base``), and the default base is the exporter itself,
``http://{{ $labels.instance }}/runbooks``: the target that raised the alert, reachable
wherever its metrics are scraped from, and always the runbooks of the version running there.

The page is ``runbooks.md`` shipped inside the package, a copy of docs/runbooks.md that
``./dev generate`` refreshes (a test checks the two are identical), rendered to HTML once.
Headings get GitHub's anchors, so one fragment works both here and on the repository's copy.
"""

from __future__ import annotations

import html
import re
from functools import cache
from importlib import resources

__all__ = ["PATH", "anchor", "page", "render", "source"]

PATH = "/runbooks"
STYLE = (
    "body{font-family:sans-serif;max-width:60em;margin:auto;padding:0 1em;line-height:1.4}"
    "pre{background:#f4f4f4;padding:.5em;overflow-x:auto}code{background:#f4f4f4}"
    "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px}"
)


def anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to -."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _slugify(value: str, separator: str) -> str:
    return anchor(value)


def source() -> str:
    """The packaged runbooks.md."""
    return resources.files(__package__).joinpath("runbooks.md").read_text(encoding="utf-8")


def render(text: str) -> str:
    """A whole HTML page of the Markdown ``text``; no script, only an inline style."""
    import markdown  # only when the page is first asked for: no cost to an exporter otherwise

    body = markdown.markdown(
        text,
        extensions=["tables", "fenced_code", "toc"],
        extension_configs={"toc": {"slugify": _slugify}},
        output_format="html",
    )
    title = html.escape(text.splitlines()[0].lstrip("# ").strip() if text else "Runbooks")
    return (
        '<!doctype html>\n<html><head><meta charset="utf-8">'
        f"<title>{title}</title><style>{STYLE}</style></head>\n"
        f'<body><p><a href="/">Dask memory exporter</a></p>\n{body}\n</body></html>\n'
    )


@cache
def page() -> str:
    """The packaged runbooks as HTML, rendered once (the file never changes at run time)."""
    return render(source())
