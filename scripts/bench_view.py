"""The two web pages in headless Chromium: how soon a 10,000-conversation `moa-local view` report is usable, and how
soon the chat page shows the first proposer text after a prompt is sent.

    .venv/bin/python scripts/bench_view.py report [--n 10000] [--runs 5] [--screenshot docs/view.png]
    flock /tmp/moa-heavy.lock .venv/bin/python scripts/bench_view.py chat --recipe tiny --backend vllm [--runs 5] \\
        [--screenshot docs/chat.png]
    .venv/bin/python scripts/bench_view.py chat --url http://127.0.0.1:8000 --model tiny [--key K]
    .venv/bin/python scripts/bench_view.py chat --stub [--replay TRACE.json]    # checks the script: stub timings

report: the sample batch output (moa_local/view/sample.py: the fake backend's records, with traces and failures)
is written and turned into a report, then opened from disk in a fresh page per run. "Usable" is the moment the page
has parsed its data, drawn the list and enabled the search box (it sets html[data-ready]): performance.now() then,
i.e. from navigation start, and the wall time around page.goto. Then a first search (it builds the search index),
a second one (both include the search box's 120 ms debounce), opening a conversation and scrolling to the end.

chat: from the Enter key (in-page clock) to the first proposer text in a card, the first answer text and the end of
the answer; and the same request read directly over HTTP (first role.delta, first content, [DONE]), alternating, so
the page's own share is the difference. The server needs the "moa_events" stream (docs/server.md).

Prints a markdown table of medians and one JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

# The system Chromium, as the browser tests launch it (Playwright's own browser download is not used).
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]
PROMPTS = ["Why is the sky blue?", "Give three tips for staying focused while studying.",
           "What is the difference between a virus and a bacterium?", "Explain what a hash table is.",
           "How do plants make their food?", "Why do we have seasons on Earth?"]


def chromium() -> str:
    path = os.environ.get("MOA_LOCAL_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        sys.exit("no Chromium found: apt-get install -y chromium (or set MOA_LOCAL_CHROMIUM)")
    return path


def med(values: list[float]) -> float:
    return statistics.median(values)


def machine() -> str:
    return f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}"


# -- report ---------------------------------------------------------------------------------------------------------

def bench_report(args: argparse.Namespace) -> None:
    from playwright.sync_api import sync_playwright

    from moa_local.view import write_report
    from moa_local.view.sample import write_sample

    folder = Path(tempfile.mkdtemp(prefix="moa-view-bench-"))
    t0 = time.perf_counter()
    source, output = write_sample(folder, args.n)
    sample_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    report = write_report(output, folder / "report.html", input=source)
    build_s = time.perf_counter() - t0
    size_mb = report.stat().st_size / 1e6
    last_id = f"q{args.n - 1:05d}"
    runs: list[dict[str, float]] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=FLAGS)
        for i in range(args.runs):
            context = browser.new_context(viewport={"width": 1400, "height": 900})
            page = context.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))  # noqa: B023 (read before the next run)
            t0 = time.perf_counter()
            page.goto(report.as_uri())
            page.wait_for_selector("html[data-ready='1']")
            wall_ms = 1000 * (time.perf_counter() - t0)
            ready_ms = page.evaluate("window.moaViewReadyAt")
            timings = {"ready_ms": ready_ms, "wall_ms": wall_ms}
            for key, query in (("search_first_ms", "volcano"), ("search_again_ms", "garden")):
                t0 = time.perf_counter()
                page.fill("#search", query)
                page.wait_for_function("q => document.querySelector('#count').dataset.query === q", arg=query)
                timings[key] = 1000 * (time.perf_counter() - t0)
            t0 = time.perf_counter()
            page.locator("#rows .row").first.click()
            page.wait_for_selector("#detail section.trace")
            timings["open_ms"] = 1000 * (time.perf_counter() - t0)
            page.fill("#search", "")
            page.wait_for_function("() => document.querySelector('#count').dataset.query === ''")
            t0 = time.perf_counter()
            page.evaluate("document.querySelector('#list').scrollTop = 1e9")
            page.wait_for_function("id => [...document.querySelectorAll('#rows .row-id')].some(e => e.textContent === id)",
                                   arg=last_id)
            timings["scroll_end_ms"] = 1000 * (time.perf_counter() - t0)
            if errors:
                sys.exit(f"the page raised: {errors}")
            runs.append(timings)
            print(f"run {i + 1}: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()), flush=True)
            if args.screenshot and i == 0:
                page.fill("#search", "")
                page.click("[data-filter=partial]")
                page.locator("#rows .row").nth(1).click()
                page.wait_for_selector("#detail section.trace")
                page.screenshot(path=str(args.screenshot))
            context.close()
        version = browser.version
        browser.close()
    keys = list(runs[0])
    result = {"n": args.n, "runs": args.runs, "report_mb": round(size_mb, 1), "sample_s": round(sample_s, 1),
              "build_s": round(build_s, 1), "chromium": version,
              **{k: round(med([r[k] for r in runs]), 1) for k in keys}}
    print()
    print(f"{args.n:,} conversations, report {size_mb:.1f} MB (built in {build_s:.1f} s; sample written in "
          f"{sample_s:.1f} s), Chromium {version} headless, {machine()}, medians of {args.runs} fresh pages")
    print()
    print("| step | median | min | max |\n|---|---|---|---|")
    labels = {"ready_ms": "usable (performance.now at data-ready)", "wall_ms": "usable (wall, around page.goto)",
              "search_first_ms": "first search (builds the index; incl. 120 ms debounce)",
              "search_again_ms": "second search (incl. 120 ms debounce)", "open_ms": "open one conversation",
              "scroll_end_ms": "scroll to the last row"}
    for k in keys:
        values = [r[k] for r in runs]
        print(f"| {labels[k]} | {med(values):.0f} ms | {min(values):.0f} ms | {max(values):.0f} ms |")
    print()
    print(json.dumps(result))


# -- chat -----------------------------------------------------------------------------------------------------------

# In the page: the Enter key's time, and the first time a proposer card and the answer show text.
PAGE_CLOCK = """
window.bench = {};
document.querySelector('#prompt').addEventListener('keydown', (e) => {
  if (e.key === 'Enter') window.bench = {sent: performance.now()};
}, true);
new MutationObserver(() => {
  const b = window.bench, now = performance.now();
  if (b.sent === undefined) return;
  if (b.proposer === undefined && [...document.querySelectorAll('.turn:last-of-type .layer .card .text')]
      .some(t => t.textContent.trim())) b.proposer = now;
  const answer = document.querySelector('.turn:last-of-type .answer-text');
  if (b.answer === undefined && answer && answer.textContent.trim()) b.answer = now;
}).observe(document.querySelector('#log'), {subtree: true, childList: true, characterData: true});
"""


@contextlib.contextmanager
def chat_server(args: argparse.Namespace) -> Iterator[tuple[str, str, str | None]]:
    """(url, model, key) of the server to measure: --url, --stub, or the real app started here on --recipe."""
    if args.url:
        yield args.url.rstrip("/"), args.model, args.key
        return
    from moa_local.server.background import BackgroundServer

    if args.stub:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "browser"))
        from stub_server import Stub, create_stub_app

        replay = json.loads(Path(args.replay).read_text()) if args.replay else None
        stub = Stub(token_delay_s=args.stub_delay, replay=replay, recipe=args.model or "tiny")
        with BackgroundServer(create_stub_app(stub)) as url:
            yield url, stub.recipe, None
        return
    from moa_local.api import load
    from moa_local.server.openai import create_app
    from moa_local.server.page import mount_page
    from moa_local.server.settings import ServerSettings

    with load(args.recipe, backend=args.backend, max_tokens=args.max_tokens) as moa:
        app = create_app(moa, settings=ServerSettings())
        if not any(getattr(r, "path", None) == "/" for r in app.routes):
            mount_page(app)
        with BackgroundServer(app) as url:
            yield url, moa.recipe.name, None


def http_stream(url: str, model: str, key: str | None, prompt: str) -> dict[str, float]:
    """Seconds from sending to the first role.delta, the first content and [DONE], read directly over HTTP."""
    import httpx

    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "stream": True, "moa_events": True}
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    out: dict[str, float] = {}
    t0 = time.perf_counter()
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers, timeout=900) as r:
        if r.status_code != 200:
            sys.exit(f"HTTP {r.status_code}: {r.read().decode()[:300]} (does the server stream moa_events?)")
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                out["done"] = time.perf_counter() - t0
                break
            obj = json.loads(line[6:])
            if obj.get("object") == "moa.event":
                if obj["type"] == "role.delta" and obj.get("delta", "").strip():
                    out.setdefault("proposer", time.perf_counter() - t0)
            elif obj.get("choices") and (obj["choices"][0].get("delta") or {}).get("content", "").strip():
                out.setdefault("answer", time.perf_counter() - t0)
    return out


def bench_chat(args: argparse.Namespace) -> None:
    from playwright.sync_api import sync_playwright

    prompts = (PROMPTS * (args.runs // len(PROMPTS) + 1))[: args.runs]
    page_rows: list[dict[str, float]] = []
    http_rows: list[dict[str, float]] = []
    with chat_server(args) as (url, model, key), sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=FLAGS)
        context = browser.new_context(viewport={"width": 1280, "height": 860})
        if key:
            context.add_init_script(f"sessionStorage.setItem('moa-local.api-key', {json.dumps(key)})")
        page = context.new_page()
        page.goto(url + "/")
        page.wait_for_selector("#model:not([disabled])")
        page.select_option("#model", model)
        page.evaluate(PAGE_CLOCK)
        http_stream(url, model, key, "Say hello.")  # warm-up, not counted
        for i, prompt in enumerate(prompts):
            for path in (("page", "http") if i % 2 == 0 else ("http", "page")):
                if path == "http":
                    row = http_stream(url, model, key, prompt)
                    http_rows.append(row)
                else:
                    page.click("#new-chat")
                    page.fill("#prompt", prompt)
                    page.press("#prompt", "Enter")
                    page.wait_for_function("() => document.querySelector('.turn') && "
                                           "document.querySelector('.turn').dataset.state !== 'streaming'",
                                           timeout=900_000)
                    b = page.evaluate("window.bench")
                    row = {k: (b[k] - b["sent"]) / 1000 for k in ("proposer", "answer") if k in b}
                    row["done"] = (page.evaluate("performance.now()") - b["sent"]) / 1000
                    page_rows.append(row)
                print(f"{path:4} prompt {i}: " + ", ".join(f"{k} {v:.2f} s" for k, v in row.items()), flush=True)
        if args.screenshot:
            page.click("#new-chat")
            page.fill("#prompt", args.screenshot_prompt or prompts[0])
            page.press("#prompt", "Enter")
            page.wait_for_function("() => document.querySelector('.turn').dataset.state !== 'streaming'",
                                   timeout=900_000)
            page.evaluate("window.scrollTo(0, 0)")
            page.screenshot(path=str(args.screenshot), full_page=True)
        version = browser.version
        browser.close()

    def m(rows: list[dict[str, float]], key: str) -> float | None:
        values = [r[key] for r in rows if key in r]
        return round(med(values), 3) if values else None

    result = {"model": model, "runs": args.runs, "chromium": version, "source": "stub" if args.stub else url if args.url
              else f"{args.recipe} on {args.backend}",
              **{f"page_{k}_s": m(page_rows, k) for k in ("proposer", "answer", "done")},
              **{f"http_{k}_s": m(http_rows, k) for k in ("proposer", "answer", "done")}}
    print()
    print(f"{result['source']}, model {model}, {args.runs} prompts per path, Chromium {version} headless, {machine()}")
    print()
    print("| from sending the prompt to | page (median s) | HTTP stream (median s) | page − HTTP |\n|---|---|---|---|")
    for k, label in (("proposer", "first proposer text"), ("answer", "first answer text"), ("done", "end of the answer")):
        a, b = result[f"page_{k}_s"], result[f"http_{k}_s"]
        gap = f"{a - b:+.3f}" if a is not None and b is not None else "—"
        print(f"| {label} | {a if a is not None else '—'} | {b if b is not None else '—'} | {gap} |")
    print()
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    r = sub.add_parser("report", help="the 10,000-conversation view report")
    r.add_argument("--n", type=int, default=10_000, help="conversations")
    r.add_argument("--runs", type=int, default=5, help="fresh pages")
    r.add_argument("--screenshot", type=Path, help="save a screenshot of one conversation here (PNG)")
    c = sub.add_parser("chat", help="the chat page: time to the first proposer text")
    c.add_argument("--url", help="a running server (else one is started here)")
    c.add_argument("--model", help="the model to pick (with --url: required; with --stub: the recipe's name)")
    c.add_argument("--key", help="API key of --url")
    c.add_argument("--recipe", default="tiny")
    c.add_argument("--backend", default="vllm")
    c.add_argument("--max-tokens", type=int, default=None, help="every role's max_tokens (default: the recipe's)")
    c.add_argument("--stub", action="store_true", help="the tests' protocol stub instead of a server")
    c.add_argument("--replay", help="with --stub: a --trace JSON file to stream")
    c.add_argument("--stub-delay", type=float, default=0.03, help="with --stub: seconds per word")
    c.add_argument("--runs", type=int, default=5, help="prompts per path")
    c.add_argument("--screenshot", type=Path, help="save a screenshot of one answer here (PNG)")
    c.add_argument("--screenshot-prompt", help="the prompt of the screenshot")
    args = parser.parse_args()
    if args.what == "chat" and args.url and not args.model:
        parser.error("--url needs --model")
    bench_report(args) if args.what == "report" else bench_chat(args)


if __name__ == "__main__":
    main()
