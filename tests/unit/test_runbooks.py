"""The runbooks page (exporter/runbooks.py): the packaged copy, its HTML and the alerts' anchors."""

from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path

from dask_memory_exporter import runbooks
from dask_memory_exporter.mixin import MixinConfig
from dask_memory_exporter.rules import add_runbook_links, alert_rules

ROOT = Path(__file__).resolve().parents[2]


class _Ids(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.ids: list[str] = []
        self.tags: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        self.ids += [v for k, v in attrs if k == "id" and v]


def _parse(page: str) -> _Ids:
    parser = _Ids()
    parser.feed(page)
    return parser


def test_packaged_copy_is_docs_runbooks() -> None:
    """exporter/runbooks.md is what ./dev generate copies from docs/runbooks.md."""
    assert runbooks.source() == (ROOT / "docs" / "runbooks.md").read_text(encoding="utf-8"), (
        "exporter/runbooks.md is stale: run ./dev generate"
    )


def test_every_alert_link_lands_on_an_anchor_of_the_served_page() -> None:
    ids = set(_parse(runbooks.page()).ids)
    config = MixinConfig()
    for rule in add_runbook_links(alert_rules(config), config.runbook_url_base):
        url = rule["annotations"]["runbook_url"]
        base, _, fragment = url.partition("#")
        assert base == config.runbook_url_base
        assert base.endswith(runbooks.PATH)
        assert fragment in ids, f"{rule['alert']}: /runbooks has no id {fragment!r}"
        assert fragment == runbooks.anchor(rule["alert"])


def test_anchors_are_githubs() -> None:
    """The same fragment works on the repository's copy of docs/runbooks.md."""
    assert runbooks.anchor("DaskWorkerPaused") == "daskworkerpaused"
    assert runbooks.anchor("Diagnose with one command") == "diagnose-with-one-command"
    assert runbooks.anchor("Heap (task) memory: `gc`?") == "heap-task-memory-gc"
    assert "diagnose-with-one-command" in _parse(runbooks.page()).ids


def test_page_is_html_with_nothing_the_csp_refuses() -> None:
    text = "# Title\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n```\ncode\n```\n"
    parsed = _parse(runbooks.render(text))
    assert {"table", "pre", "h1", "style"} <= parsed.tags
    assert "script" not in parsed.tags and "img" not in parsed.tags
    assert "<title>Title</title>" in runbooks.render("# Title\n")
