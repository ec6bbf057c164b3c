"""The project's one YAML writer: every generated YAML file (rules, provisioning) goes through it.

Block style in the order the data was built (no key sorting), multi-line strings (PromQL,
dashboard JSON) as readable ``|`` literal blocks, and no line folding, so a long annotation or
expression stays on one line and a diff of the committed files shows what changed. Safe: only
plain data (and :class:`Inline`) can be written.
"""

from __future__ import annotations

from typing import Any

import yaml

__all__ = ["Inline", "dump"]

_NO_FOLDING = 1_000_000
"""Line width beyond any line we write: PyYAML folds long plain scalars at ``width``."""


class Inline(dict[str, Any]):
    """A mapping written on one line, ``{a: 1, b: 2}`` (e.g. a promtool input series)."""


class _Dumper(yaml.SafeDumper):
    """SafeDumper with literal blocks for multi-line strings and one-line :class:`Inline`."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    if "\n" in value:
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|")
    return dumper.represent_str(value)


def _inline(dumper: yaml.SafeDumper, value: Inline) -> yaml.MappingNode:
    return dumper.represent_mapping("tag:yaml.org,2002:map", value, flow_style=True)


_Dumper.add_representer(str, _str)
_Dumper.add_representer(Inline, _inline)


def dump(data: Any) -> str:
    """``data`` as YAML text in the project's style (see the module docstring)."""
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, width=_NO_FOLDING)
