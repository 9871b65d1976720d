"""Regenerate the README's screenshots of the two pages, in headless Chromium:

    .venv/bin/python scripts/screenshots.py            # writes docs/view.png and docs/chat.png

docs/view.png: `moa-local view docs/eval/math`, filtered to the items where MoA beat the best single system, one
item open (its layers side by side). docs/chat.png: the chat page answering the same item's question, streamed from
that item's recorded trace by the tests' protocol stub (real tiny-model texts, tokens and seconds; the stub only
replays them). With a server that streams moa_events, `scripts/bench_view.py chat --screenshot` takes it live.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ITEM = "basic_arithmetic-83"
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "tests" / "browser"))


def main() -> None:
    from bench_view import FLAGS, chromium
    from playwright.sync_api import sync_playwright
    from stub_server import Stub, create_stub_app

    from moa_local.eval.base import get_suite
    from moa_local.server.background import BackgroundServer
    from moa_local.view import write_report

    os.chdir(ROOT)  # the report names its source as given: a relative path, not this machine's
    folder = Path("docs/eval/math")
    row = next(r for line in (folder / "results.jsonl").read_text().splitlines()
               if (r := json.loads(line))["system"] == "moa" and r["item"] == ITEM)
    question = next(i.turns[0] for i in get_suite("math").items() if i.id == ITEM)
    report = write_report(folder, Path(tempfile.mkdtemp()) / "math.html")
    stub = Stub(token_delay_s=0.01, replay=row["trace"][0], recipe=row["recipe"])
    with sync_playwright() as p, BackgroundServer(create_stub_app(stub)) as url:
        browser = p.chromium.launch(executable_path=chromium(), args=FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto(report.as_uri())
        page.wait_for_selector("html[data-ready='1']")
        page.click("[data-filter=won]")
        page.locator("#rows .row", has_text=ITEM).click()
        page.wait_for_selector("#detail section.trace")
        page.screenshot(path=str(ROOT / "docs" / "view.png"))
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(url + "/")
        page.wait_for_selector("#model:not([disabled])")
        page.fill("#prompt", question)
        page.press("#prompt", "Enter")
        page.wait_for_function("() => document.querySelector('.turn').dataset.state === 'done'")
        page.evaluate("window.scrollTo(0, 0)")
        page.screenshot(path=str(ROOT / "docs" / "chat.png"))
        browser.close()
    print("wrote docs/view.png and docs/chat.png")


if __name__ == "__main__":
    main()
