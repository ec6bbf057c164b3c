"""tests/rules/*.yaml (the promtool unit tests) are written by tests/rules/generate.py.

Like the rule and dashboard drift tests: the committed YAML must be exactly what the generator
writes, so a case edited in the YAML alone (or in generate.py without regenerating) fails here
rather than silently testing something else than the generator says.
"""

from __future__ import annotations

from pathlib import Path

from tests.rules.generate import render

RULE_TESTS = Path(__file__).resolve().parents[1] / "rules"


def test_committed_promtool_tests_match_generator() -> None:
    expected = render()
    committed = {p.name for p in RULE_TESTS.glob("*.yaml")}
    assert committed == set(expected), "tests/rules/*.yaml and generate.py disagree on files"
    for name, text in expected.items():
        assert (RULE_TESTS / name).read_text() == text, (
            f"tests/rules/{name} is stale: run .venv/bin/python tests/rules/generate.py"
        )
