"""Browser tests: Playwright for Python driving the system's Chromium (Debian's `chromium` package; Playwright's own
browser download is not used). Every test here is skipped, with the reason printed, when Playwright or a Chromium
is missing: `apt-get install -y chromium` and the `dev` extra bring both.

`page` fails its test on any console error or uncaught exception, except the ones a test expects.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from collections.abc import Iterator
from typing import Any

import pytest

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]


def find_chromium() -> str | None:
    """$MOA_LOCAL_CHROMIUM, else the first Chromium on PATH."""
    if os.environ.get("MOA_LOCAL_CHROMIUM"):
        return os.environ["MOA_LOCAL_CHROMIUM"]
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if path := shutil.which(name):
            return path
    return None


CHROMIUM = find_chromium()
SKIP_REASON = (
    "browser tests skipped: Playwright is not installed (pip install -e '.[dev]')"
    if importlib.util.find_spec("playwright") is None
    else "browser tests skipped: no Chromium found (apt-get install -y chromium, or set MOA_LOCAL_CHROMIUM)"
    if CHROMIUM is None else None
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/browser/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(pytest.mark.browser)
            if SKIP_REASON:
                item.add_marker(pytest.mark.skip(reason=SKIP_REASON))


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    # Module scope, not session: Playwright's sync API holds an asyncio loop as the main thread's
    # running loop while it is open, and a later test's asyncio.run() would refuse to start.
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield b
        b.close()


class ConsoleLog:
    """Console errors and uncaught exceptions of one page; ``allow`` takes substrings a test expects."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.allowed: list[str] = []

    def allow(self, text: str) -> None:
        self.allowed.append(text)

    def unexpected(self) -> list[str]:
        return [e for e in self.errors if not any(a in e for a in self.allowed)]


@pytest.fixture
def console() -> ConsoleLog:
    return ConsoleLog()


@pytest.fixture
def page(browser: Any, console: ConsoleLog) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    pg = context.new_page()
    pg.set_default_timeout(20_000)
    pg.on("console", lambda m: console.errors.append(f"console.{m.type}: {m.text}") if m.type == "error" else None)
    pg.on("pageerror", lambda e: console.errors.append(f"uncaught: {e}"))
    yield pg
    context.close()
    assert console.unexpected() == [], "the page logged errors"


if __name__ == "__main__":  # `make test` prints this line first, so a skip is never silent
    print(SKIP_REASON or f"browser tests: run with {CHROMIUM}")
