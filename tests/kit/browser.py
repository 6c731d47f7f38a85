"""A real browser for tests: Debian's Chromium driven by Playwright's sync API.

``with_browser(url, steps)`` opens a fresh headless Chromium on ``url`` (an
admin listener's status page: it checks the answer is 200 with the page's
Content-Security-Policy), runs ``steps(Browser)`` and returns what went to the
console as errors. It blocks, so tests call it in a worker thread
(``trio.to_thread.run_sync``) and reach back to trio with ``trio.from_thread``.
``needs_browser`` skips a test on a machine without Playwright or Chromium;
``expect`` is Playwright's (None there). Screenshots go to ``ARTIFACTS``
(``tests/artifacts/``), for a human to look at.

What is not here: servers (the tests start the proxy and its admin listener)
and anything about one page's markup beyond the status page's backend rows.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

try:
    from playwright.sync_api import Page, expect, sync_playwright
except ImportError:  # pragma: no cover - depends on the machine
    sync_playwright = None  # type: ignore[assignment]
    expect = None  # type: ignore[assignment]

#: Debian's Chromium (``apt-get install chromium``); Playwright drives it instead of its own download.
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
#: Where screenshots go (``tests/artifacts/``).
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
#: What Chromium itself logs for a fetch answered 401: expected while the page asks for the token.
UNAUTHORIZED_LOG = "Failed to load resource: the server responded with a status of 401"

needs_browser = pytest.mark.skipif(
    sync_playwright is None or not os.path.exists(CHROMIUM),
    reason=(
        "the Python playwright package is not installed"
        if sync_playwright is None
        else f"no Chromium at {CHROMIUM} (apt-get install chromium)"
    ),
)


@dataclass
class Browser:
    """A page of the status page, and the errors its console saw so far."""

    page: Page
    errors: list[str]  # console errors and uncaught exceptions, in order

    def row(self, backend: str) -> Any:
        return self.page.locator(f'tr[data-backend="{backend}"]')

    def state(self, backend: str) -> Any:
        return self.row(backend).locator(".state-badge")

    def screenshot(self, name: str) -> None:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(ARTIFACTS / name), full_page=True)


def with_browser(url: str, steps: Callable[[Browser], None], **context: Any) -> list[str]:
    """Run ``steps`` against a fresh page at ``url`` (in this thread); return what went to the console as errors."""
    assert sync_playwright is not None
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_context(**context).new_page()
            page.set_default_timeout(5000)
            expect.set_options(timeout=5000)
            errors: list[str] = []
            page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
            page.on("pageerror", lambda exc: errors.append(f"uncaught: {exc}"))
            response = page.goto(url)
            assert response is not None and response.status == 200
            assert "default-src 'self'" in response.headers["content-security-policy"]
            steps(Browser(page, errors))
            return errors
        finally:
            browser.close()


def no_horizontal_scroll(page: Page) -> None:
    width = page.evaluate("[document.scrollingElement.scrollWidth, window.innerWidth]")
    assert width[0] <= width[1], f"horizontal scroll: content {width[0]} px wide in a {width[1]} px viewport"
