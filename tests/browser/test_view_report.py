"""`moa-local view` reports in Chromium: 10,000 conversations from the batch runner's records (fake backend, with
failures) open fast, search, filter and show one conversation; a real eval folder shows where MoA won and lost."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from moa_local.view import write_report
from moa_local.view.sample import FAILED_EVERY, PARTIAL_EVERY, write_sample

N = 10_000
DOCS_EVAL = Path(__file__).resolve().parents[2] / "docs" / "eval"


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    folder = tmp_path_factory.mktemp("view")
    source, output = write_sample(folder, N)
    report = write_report(output, folder / "report.html", input=source)
    prompts = {json.loads(line)["id"]: json.loads(line)["prompt"] for line in source.read_text().splitlines()}
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    yield {"report": report, "prompts": prompts, "rows": rows}


def open_report(page: Any, path: Path) -> list[str]:
    """Open a report from disk; return every URL the page requested (it must fetch nothing but itself)."""
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto(path.as_uri())
    page.wait_for_selector("html[data-ready='1']")
    return requests


def search(page: Any, text: str) -> None:
    page.fill("#search", text)
    page.wait_for_function("q => document.querySelector('#count').dataset.query === q", arg=text.strip().lower())


def test_ten_thousand_conversations_open_search_and_show_one(page: Any, sample: dict[str, Any]) -> None:
    requests = open_report(page, sample["report"])
    assert requests == [sample["report"].as_uri()]
    assert page.evaluate("window.moaViewReadyAt") < 10_000  # ms; the benchmark records the real time
    assert page.inner_text("#count") == "10,000 of 10,000"
    assert 0 < page.locator("#rows .row").count() < 100  # a virtual list: only the visible rows exist
    # Text search, counted independently here from the records and prompts.
    expected = sum(1 for r in sample["rows"] if "volcano" in (sample["prompts"][r["id"]] + json.dumps(r)).lower())
    search(page, "Volcano")
    assert 0 < expected < N and page.inner_text("#count") == f"{expected:,} of 10,000"
    assert "volcano" in page.locator("#rows .row").first.inner_text().lower()
    # An id typed in full comes first; open it: its layers side by side, a failed role marked.
    partial = f"q{2 * PARTIAL_EVERY - 1:05d}"
    search(page, partial)
    page.locator("#rows .row").first.click()
    detail = page.locator("#detail")
    assert detail.locator("h2").inner_text().startswith(partial)
    assert detail.locator(".layers .layer").count() == 2 and detail.locator(".layer .card").count() == 4
    failed = detail.locator('.layer .card.failed')
    assert failed.count() == 2 and all("gemma3" in t for t in failed.all_inner_texts())
    assert "fake failure: request contains '#fail'" in failed.first.inner_text()
    row = next(r for r in sample["rows"] if r["id"] == partial)
    assert detail.locator(".card.agg .text").inner_text() == row["output"]
    assert detail.locator(".card.closest").count() == 1  # the reference the answer is closest to
    assert "Closest reference: smollm2" in detail.inner_text()
    assert "ROUGE-1" in detail.locator(".foot").inner_text()  # the similarity is stated
    assert page.evaluate("location.hash") == f"#{partial}"
    # Filters: failed conversations, counted by the sample's construction.
    search(page, "")
    page.click("[data-filter=failed]")
    assert page.inner_text("#count") == f"{N // FAILED_EVERY} of 10,000"
    page.locator("#rows .row").first.click()
    assert "only 0 of 2 proposers answered" in detail.locator(".banner.bad").first.inner_text()
    # The end of the list is reachable by scrolling (rows are placed, not all built).
    page.click("[data-filter=all]")
    page.evaluate("document.querySelector('#list').scrollTop = 1e9")
    page.wait_for_function("() => [...document.querySelectorAll('#rows .row-id')].some(e => e.textContent === 'q09999')")


def test_eval_folder_shows_where_moa_won_and_lost_against_the_best_single_system(page: Any, tmp_path: Path) -> None:
    folder = DOCS_EVAL / "math"
    rows = [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]
    best = "aggregator:smollm2-135m-instruct"  # docs/eval/math/report.md: the best single model
    score = {(r["system"], r["item"]): r["score"] for r in rows}
    items = {r["item"] for r in rows}
    lost = sorted(i for i in items if score["moa", i] < score[best, i])
    won = sorted(i for i in items if score["moa", i] > score[best, i])
    report = write_report(folder, tmp_path / "math.html")
    open_report(page, report)
    assert f"{best} (best single)" in page.inner_text("#detail")
    page.click("[data-filter=lost]")
    assert page.inner_text("#count") == f"{len(lost)} of 200" and lost
    page.locator("#rows .row").first.click()
    detail = page.locator("#detail")
    item = detail.locator("h2 span").first.inner_text()
    assert item in lost
    assert detail.locator(".banner").first.inner_text().startswith(f"MoA lost against the best single system ({best})")
    assert detail.locator("section.trace").first.locator("h3").inner_text() == "moa"
    assert detail.locator("section.trace").first.locator(".layer").count() == 2
    page.click("[data-filter=won]")
    assert page.inner_text("#count") == f"{len(won)} of 200"
