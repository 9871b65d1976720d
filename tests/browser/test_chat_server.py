"""The chat page against the real `moa-local serve` app: on the fake backend (fast, texts checked against the
server's own trace) and on the tiny recipe through vLLM (integration). Both need the server to stream the
"moa_events" protocol (docs/server.md); against a server that refuses the field they skip and say so. The first
test needs no events: the real app serves the page, which asks for the key on a real 401 and lists the models."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from moa_local.api import MoA, load
from moa_local.config import load_model_config, load_recipe
from moa_local.config.recipe import FakeOptions
from moa_local.engines.fake import fake_pool
from moa_local.server.background import BackgroundServer
from moa_local.server.openai import create_app
from moa_local.server.page import mount_page
from moa_local.server.settings import ServerSettings

KEY = "page-test-key"
PROMPT = "Why is the sky blue? Answer in one sentence."


def serve_with_page(moa: MoA) -> BackgroundServer:
    app = create_app(moa, settings=ServerSettings(api_key=KEY))
    if not any(getattr(r, "path", None) == "/" for r in app.routes):  # until create_app mounts the page itself
        mount_page(app)
    return BackgroundServer(app)


def require_events(url: str, model: str) -> None:
    """Skip unless the server accepts "moa_events" (the streaming protocol the page reads)."""
    body = {"model": model, "messages": [{"role": "user", "content": "ping"}], "stream": True, "moa_events": True,
            "max_tokens": 1}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=600,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        if r.status_code == 400 and "moa_events" in r.read().decode():
            pytest.skip("the server does not stream moa_events yet (the protocol in docs/server.md)")
        for _ in r.iter_lines():  # drain, so the server finishes this request
            pass


def open_with_key(page: Any, url: str, console: Any) -> None:
    console.allow("status of 401")  # Chromium logs every non-2xx response; the page handles these
    page.goto(url + "/")
    page.locator("#key-dialog").wait_for(state="visible")
    page.fill("#key-input", "not-the-key")
    page.press("#key-input", "Enter")
    page.wait_for_function("() => document.querySelector('#key-message').textContent.startsWith('The key was refused')")
    assert "missing or wrong API key" in page.inner_text("#key-message")
    page.fill("#key-input", KEY)
    page.press("#key-input", "Enter")
    page.wait_for_selector("#model:not([disabled])")


def ask_and_wait(page: Any, prompt: str, *, timeout_ms: int) -> Any:
    before = page.locator(".turn").count()
    page.fill("#prompt", prompt)
    page.press("#prompt", "Enter")
    turn = page.locator(".turn").nth(before)
    turn.locator(".card.agg").wait_for()
    page.wait_for_function("t => t.dataset.state !== 'streaming'", arg=turn.element_handle(), timeout=timeout_ms)
    assert turn.get_attribute("data-state") == "done", turn.inner_text()
    return turn


# -- fake backend ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fake_server() -> Iterator[str]:
    recipe = load_recipe("fake")
    pool = fake_pool(recipe)
    for engine in pool.engines.values():
        engine.options = FakeOptions(token_delay_s=0.01)  # type: ignore[attr-defined]
    with serve_with_page(MoA(recipe, pool, backend="fake")) as url:
        yield url


def test_the_real_app_serves_the_page_which_asks_for_the_key_and_lists_its_models(
        page: Any, console: Any, fake_server: str) -> None:
    open_with_key(page, fake_server, console)
    assert page.locator("#model option").all_inner_texts() == [
        "fake (MoA recipe)", "smollm2-135m-instruct (one model)", "gemma3-270m (one model)"]
    assert page.evaluate("sessionStorage.getItem('moa-local.api-key')") == KEY


def test_fake_backend_cards_match_the_servers_own_trace(page: Any, console: Any, fake_server: str) -> None:
    require_events(fake_server, "fake")
    open_with_key(page, fake_server, console)
    turn = ask_and_wait(page, PROMPT, timeout_ms=60_000)
    trace = httpx.post(f"{fake_server}/v1/chat/completions", timeout=60, headers={"Authorization": f"Bearer {KEY}"},
                       json={"model": "fake", "messages": [{"role": "user", "content": PROMPT}],
                             "moa_trace": True}).json()["moa_trace"]
    for layer in trace["layers"]:
        for r in layer["responses"]:
            card = turn.locator(f'.layer[data-layer="{layer["index"]}"] .card[data-role="{r["role"]}"]')
            assert card.locator(".text").text_content() == r["text"]  # exact: raw text, no layout
            assert f'→ {r["usage"]["completion_tokens"]} tok' in card.inner_text()
    assert turn.locator(".answer-text").text_content() == trace["output"]
    turn.locator("button.fold").click()
    assert not turn.locator(".layers").is_visible() and turn.locator(".answer-text").is_visible()
    second = ask_and_wait(page, "And at sunset?", timeout_ms=60_000)  # multi-turn on the real server
    assert second.locator(".answer-text").inner_text().strip()


# -- the tiny recipe on vLLM ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vllm_server(fake_server: str) -> Iterator[str]:
    from moa_local.models import is_prepared

    require_events(fake_server, "fake")  # asked of the instant fake app first: no engine starts just to skip
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm is not importable")
    for model_id in load_recipe("tiny").model_ids():
        if not is_prepared(load_model_config(model_id)):
            pytest.skip(f"{model_id} not prepared: run `moa-local models prepare`")
    with load("tiny", backend="vllm", max_tokens=32) as moa, serve_with_page(moa) as url:
        require_events(url, "tiny")
        yield url


@pytest.mark.integration
@pytest.mark.vllm
def test_tiny_recipe_on_vllm_streams_every_proposer_then_the_answer(page: Any, console: Any, vllm_server: str) -> None:
    open_with_key(page, vllm_server, console)
    turn = ask_and_wait(page, PROMPT, timeout_ms=600_000)
    cards = turn.locator(".layer .card")
    assert cards.count() == 4  # tiny: 2 layers x 2 proposers
    for i in range(4):
        card = cards.nth(i)
        assert card.get_attribute("data-state") == "done" and card.locator(".text").inner_text().strip()
        assert " tok" in card.locator(".meta").inner_text() and " s" in card.locator(".meta").inner_text()
    assert turn.locator(".answer-text").inner_text().strip()
