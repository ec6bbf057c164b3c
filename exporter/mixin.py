"""The monitoring mixin's one configuration, shared by the rule and dashboard generators.

Like kubernetes-mixin's ``_config``: every selector, window, ``for:`` duration, severity and
grouping label lives here with a comment, and ``rules.py`` / ``dashboards.py`` interpolate it
instead of hard-coding ``job="..."``. Pure data: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MixinConfig:
    """Settings for generated alerts, recording rules and dashboards."""

    exporter_selector: str = 'job="dask-memory-exporter"'
    """PromQL label matchers selecting the exporter's series (no braces)."""

    cluster_labels: tuple[str, ...] = ("namespace", "job", "instance")
    """Target labels that together identify one Dask cluster (one exporter target)."""

    runbook_url_base: str = (
        "https://github.com/dask-memory-exporter/dask-memory-exporter/blob/main/docs/runbooks.md"
    )
    """Runbook links are ``{runbook_url_base}#{alertname lower-cased}``."""

    dashboard_refresh: str = "30s"
    """Refresh interval of the generated dashboards."""

    dashboard_tags: tuple[str, ...] = ("dask", "dask-memory-exporter")
    """Tags applied to every generated dashboard."""

    def selector(self, *extra: str) -> str:
        """Braced PromQL selector: the exporter selector plus extra matchers."""
        parts = [p for p in (self.exporter_selector, *extra) if p]
        return "{" + ", ".join(parts) + "}"

    @property
    def cluster_by(self) -> str:
        """Comma-separated grouping labels for ``by (...)`` clauses."""
        return ", ".join(self.cluster_labels)
