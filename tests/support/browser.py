"""Test support: screenshots of a page in headless Chromium (Debian's ``chromium`` package).

Also a command, to refresh the screenshot in the docs from a running demo::

    .venv/bin/python -m tests.support.browser http://127.0.0.1:9787/ docs/landing-page.png 470

(the last argument, optional, is the window's height in pixels).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

__all__ = ["WINDOW", "chromium", "screenshot"]

WINDOW = (1200, 900)  # CSS pixels, at a device scale factor of 1: one pixel per CSS pixel


def chromium() -> str:
    path = shutil.which("chromium")
    # ./dev installs it (APT_PACKAGES): a machine without it fails the test rather than skip it.
    assert path is not None, "chromium not found: ./dev test installs the Debian package"
    return path


def screenshot(url: str, out: Path, window: tuple[int, int] = WINDOW) -> None:
    """Load ``url`` in a fresh headless Chromium profile and write a PNG of the window."""
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        proc = subprocess.run(
            [
                chromium(),
                "--headless",
                "--no-sandbox",  # root on CI machines
                "--disable-gpu",
                "--no-first-run",
                "--hide-scrollbars",
                "--force-device-scale-factor=1",
                f"--user-data-dir={profile}",
                f"--window-size={window[0]},{window[1]}",
                f"--screenshot={out}",
                url,
            ],
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
    assert proc.returncode == 0 and out.exists(), proc.stderr[-2000:]


if __name__ == "__main__":
    height = int(sys.argv[3]) if len(sys.argv) > 3 else WINDOW[1]
    screenshot(sys.argv[1], Path(sys.argv[2]), (WINDOW[0], height))
