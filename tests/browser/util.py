"""Headless Chromium from the tests: ``check_page`` runs ``check_page.mjs`` (playwright-core driving
Debian's /usr/bin/chromium) and returns what it saw. Tests skip with the reason when either is
missing; ``.ci/run`` installs both."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
CHROMIUM = "/usr/bin/chromium"


def browser_available() -> str | None:
    """None when browser tests can run here, else why not."""
    if not Path(CHROMIUM).exists():
        return "no /usr/bin/chromium (apt-get install chromium; .ci/run does)"
    if shutil.which("node") is None:
        return "no node"
    if not (HERE / "node_modules" / "playwright-core").is_dir():
        return "no playwright-core (npm ci --prefix tests/browser; .ci/run does)"
    return None


def check_page(url: str, *, timeout: float = 120, **spec) -> dict:
    """Open ``url`` (file:// or a loopback http:// given in ``allow``) and report console errors,
    page errors, requests that left the page's origin, broken images, the visible text, and
    ``value`` (``evaluate``) / a screenshot when asked. ``steps`` click, fill and wait."""
    why = browser_available()
    if why:
        pytest.skip(why)
    r = subprocess.run(
        ["node", str(HERE / "check_page.mjs"), json.dumps({"url": url, **spec})],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=HERE,
    )
    if r.returncode != 0:
        raise AssertionError(f"check_page failed: {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])
