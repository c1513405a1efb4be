"""Browser tests: the operator console in Debian's Chromium, driven by Playwright.

The stack and the webhook receiver are the integration tests' own fixtures.
Playwright cannot download its browsers here: it drives ``/usr/bin/chromium``
(``apt-get install chromium``, done by ``.ci/run``), or ``CHROMIUM`` when set.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import make_stack, pytest_runtest_makereport, receiver

__all__ = ["browser", "make_stack", "pytest_runtest_makereport", "receiver", "screenshots"]


def _chromium() -> str | None:
    path = os.environ.get("CHROMIUM") or "/usr/bin/chromium"
    return path if Path(path).exists() else shutil.which("chromium")


@pytest.fixture
def browser() -> Iterator[Any]:
    """Chromium, for one test: Playwright's sync API runs an asyncio loop in this thread
    while it is open, so it must close before any later test calls ``asyncio.run()``."""
    executable = _chromium()
    if executable is None:
        pytest.skip("Chromium is not installed (apt-get install chromium; .ci/run does it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
        launched = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield launched
        launched.close()


@pytest.fixture
def screenshots(tmp_path: Path) -> Path:
    """Where screenshots go: ``CONSOLE_SCREENSHOTS`` (``make browser``: docs/images), else a temp dir."""
    target = Path(os.environ.get("CONSOLE_SCREENSHOTS") or tmp_path / "screenshots")
    target.mkdir(parents=True, exist_ok=True)
    return target
