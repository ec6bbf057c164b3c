"""Test support: the example remediation route merged into the example Alertmanager config.

deploy/alertmanager/remediation.yaml says how to use it: its ``dask-remediate`` route goes
first under the existing routes, and its receiver beside the others. This does exactly that,
so the tests check the documented merge, not a configuration of their own.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
ALERTMANAGER_CONFIG = ROOT / "deploy" / "alertmanager" / "alertmanager.yaml"
REMEDIATION_CONFIG = ROOT / "deploy" / "alertmanager" / "remediation.yaml"
RECEIVER = "dask-remediate"


def merged_config() -> dict[str, Any]:
    """alertmanager.yaml with remediation.yaml's route (first) and receiver added."""
    base: dict[str, Any] = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())
    extra: dict[str, Any] = yaml.safe_load(REMEDIATION_CONFIG.read_text())
    merged = copy.deepcopy(base)
    [route] = [r for r in extra["route"]["routes"] if r["receiver"] == RECEIVER]
    [receiver] = [r for r in extra["receivers"] if r["name"] == RECEIVER]
    merged["route"]["routes"].insert(0, route)
    merged["receivers"].append(receiver)
    return merged
