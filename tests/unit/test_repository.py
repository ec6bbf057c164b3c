"""The repository itself: no merge left half-done in a tracked text file."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MARKER = re.compile(r"^(<{7}|>{7}) ", re.M)


def test_no_conflict_markers_in_tracked_files() -> None:
    """A marker inside a docstring or a Markdown file passes every linter: look for it."""
    files = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    found = []
    for name in files:
        path = ROOT / name
        if not path.is_file() or path.suffix in (".png", ".gz"):
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        if MARKER.search(text):
            found.append(name)
    assert not found, f"merge conflict markers in {found}"
