"""The chat page in Chromium against the protocol stub (tests/browser/stub_server.py): cards fill live, layer by
layer, the answer streams below them; retries, failures, a wrong key, folding, multi-turn, a single model."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import stub_server as stub_mod
from stub_server import Stub, create_stub_app

from moa_local.server.background import BackgroundServer

# Records, in the page, the time and length of every change of each card's text (cards are keyed layer|role,
# the answer "answer"), so a test can see streaming happen rather than only its end.
TIMELINE = """
window.timeline = [];
new MutationObserver((records) => {
  const now = performance.now();
  for (const r of records) {
    const card = (r.target.nodeType === 3 ? r.target.parentElement : r.target).closest(".card");
    if (!card) continue;
    const key = card.classList.contains("agg") ? "answer" : card.dataset.layer + "|" + card.dataset.role;
    window.timeline.push([key, now, card.querySelector(".text").textContent.length]);
  }
}).observe(document.documentElement, {subtree: true, characterData: true, childList: true});
"""


@pytest.fixture
def stub() -> Iterator[tuple[Stub, str]]:
    state = Stub()
    with BackgroundServer(create_stub_app(state)) as url:
        yield state, url


def open_chat(page: Any, url: str) -> None:
    page.goto(url + "/")
    page.wait_for_selector("#model:not([disabled])")


def ask(page: Any, prompt: str) -> Any:
    before = page.locator(".turn").count()
    page.fill("#prompt", prompt)
    page.press("#prompt", "Enter")
    turn = page.locator(".turn").nth(before)  # a fixed index: .last would move on to later turns
    turn.locator(".card.agg").wait_for()
    return turn


def wait_turn(turn: Any, state: str = "done") -> None:
    turn.page.wait_for_function("t => t.dataset.state !== 'streaming'", arg=turn.element_handle(), timeout=20_000)
    assert turn.get_attribute("data-state") == state, turn.inner_text()


def test_every_proposer_card_fills_live_then_the_answer_streams(page: Any, stub: tuple[Stub, str]) -> None:
    state, url = stub
    open_chat(page, url)
    options = page.locator("#model option").all_inner_texts()
    assert options[0] == "stub-recipe (MoA recipe)" and "smollm2-135m-instruct (one model)" in options
    page.evaluate(TIMELINE)
    turn = ask(page, "Why is the sky blue?")
    # The plan shows every card before any text: 2 layers x 2 proposers.
    assert turn.locator(".layer").count() == 2 and turn.locator(".layer .card").count() == 4
    wait_turn(turn)
    prompt = "Why is the sky blue?"
    for layer in (1, 2):
        for role in ("smollm2", "gemma3"):
            card = turn.locator(f'.layer[data-layer="{layer}"] .card[data-role="{role}"]')
            assert card.locator(".text").inner_text() == stub_mod.proposer_text(layer, role, prompt)
            assert card.get_attribute("data-state") == "done"
            assert f"{10 * layer} → {len(stub_mod.proposer_text(layer, role, prompt).split())} tok" in card.inner_text()
    assert turn.locator(".answer-text").inner_text() == stub_mod.answer_text(prompt, 1)
    assert turn.locator(".card.agg header").inner_text().split() == ["aggregator", "smollm2-135m-instruct"]
    assert "1.25 s" in turn.locator(".card.agg .meta").inner_text()
    timeline = page.evaluate("window.timeline")
    first = {k: t for k, t, n in reversed(timeline) if n > 0}
    last = {k: t for k, t, _ in timeline}
    growth = {k: len({n for kk, _, n in timeline if kk == k}) for k in first}
    # Each card grew over many updates (streamed), layer 2 began after layer 1 ended, the answer after both.
    assert all(growth[k] >= 5 for k in ("1|smollm2", "1|gemma3", "2|smollm2", "2|gemma3", "answer")), growth
    assert min(first["2|smollm2"], first["2|gemma3"]) > max(last["1|smollm2"], last["1|gemma3"]) - 1
    assert first["answer"] > max(last["2|smollm2"], last["2|gemma3"]) - 1
    assert state.requests[0]["stream"] is True and state.requests[0]["moa_events"] is True
    assert "all 4 proposer answers done" in turn.locator(".progress").inner_text()


def test_a_retry_starts_the_card_over_and_a_failed_role_is_marked(page: Any, stub: tuple[Stub, str]) -> None:
    _, url = stub
    open_chat(page, url)
    turn = ask(page, "Tell me a joke #retry")
    wait_turn(turn)
    retried = turn.locator('.layer[data-layer="1"] .card[data-role="gemma3"]')
    assert retried.locator(".text").inner_text() == stub_mod.proposer_text(1, "gemma3", "Tell me a joke #retry")
    assert "2 attempts" in retried.inner_text()
    turn = ask(page, "Another one #fail-role")
    wait_turn(turn)
    failed = turn.locator('.card[data-role="gemma3"][data-state="failed"]')
    assert failed.count() == 2
    assert failed.first.locator(".err").inner_text() == "fake failure: request contains '#fail-role'"
    assert turn.locator(".answer-text").inner_text().startswith("Final answer")


def test_multi_turn_sends_the_history_and_fold_hides_the_layers(page: Any, stub: tuple[Stub, str]) -> None:
    state, url = stub
    open_chat(page, url)
    first = ask(page, "First question")
    wait_turn(first)
    second = ask(page, "Second question")
    wait_turn(second)
    assert state.requests[1]["messages"] == [
        {"role": "user", "content": "First question"},
        {"role": "assistant", "content": stub_mod.answer_text("First question", 1)},
        {"role": "user", "content": "Second question"},
    ]
    assert second.locator(".answer-text").inner_text() == stub_mod.answer_text("Second question", 2)
    layers = first.locator(".layers")
    assert layers.is_visible()
    first.locator("button.fold").click()
    assert not layers.is_visible() and second.locator(".layers").is_visible()
    assert first.locator("button.fold").get_attribute("aria-expanded") == "false"
    first.locator("button.fold").click()
    assert layers.is_visible()
    page.check("#fold-all")
    assert not layers.is_visible() and not second.locator(".layers").is_visible()
    third = ask(page, "Third question")  # new answers follow the switch
    wait_turn(third)
    assert not third.locator(".layers").is_visible() and third.locator(".answer-text").is_visible()


def test_a_failed_conversation_and_a_busy_server_are_reported_and_left_out(page: Any, stub: tuple[Stub, str],
                                                                           console: Any) -> None:
    state, url = stub
    open_chat(page, url)
    console.allow("status of 429")  # Chromium logs every non-2xx response; the page handles this one
    turn = ask(page, "Break it #fail-all")
    wait_turn(turn, "failed")
    assert "The answer failed: layer 2: only 0 of 2 proposers answered" in turn.locator(".banner").inner_text()
    busy = ask(page, "Too many #busy")
    wait_turn(busy, "failed")
    assert "The server is busy" in busy.locator(".banner").inner_text()
    ok = ask(page, "Fine now")
    wait_turn(ok)
    assert state.requests[-1]["messages"] == [{"role": "user", "content": "Fine now"}]  # failed turns left out


def test_one_model_alone_has_no_layers(page: Any, stub: tuple[Stub, str]) -> None:
    state, url = stub
    open_chat(page, url)
    page.select_option("#model", "smollm2-135m-instruct")
    turn = ask(page, "Hello")
    wait_turn(turn)
    assert turn.locator(".answer-text").inner_text() == stub_mod.single_text("Hello")
    assert not turn.locator(".layers").is_visible() and turn.locator(".layer .card").count() == 0
    assert state.requests[-1]["model"] == "smollm2-135m-instruct"


def test_the_key_is_asked_on_401_a_wrong_one_is_said_and_the_right_one_kept_for_the_tab(
        page: Any, stub: tuple[Stub, str], console: Any) -> None:
    state, url = stub
    state.api_key = "s3cret"
    console.allow("status of 401")  # Chromium logs every non-2xx response; the page handles this one
    page.goto(url + "/")
    dialog = page.locator("#key-dialog")
    dialog.wait_for(state="visible")
    assert "needs an API key" in page.inner_text("#key-message")
    page.fill("#key-input", "wrong")
    page.press("#key-input", "Enter")
    page.wait_for_function("() => document.querySelector('#key-message').textContent.startsWith('The key was refused')")
    assert "missing or wrong API key" in page.inner_text("#key-message") and dialog.is_visible()
    page.fill("#key-input", "s3cret")
    page.click("#key-ok")
    page.wait_for_selector("#model:not([disabled])")
    assert not dialog.is_visible()
    wait_turn(ask(page, "With the key"))
    assert page.evaluate("sessionStorage.getItem('moa-local.api-key')") == "s3cret"
    page.reload()
    page.wait_for_selector("#model:not([disabled])")
    assert not dialog.is_visible()  # kept for the tab: not asked again
    state.api_key = "rotated"  # the key changes under the page: the next request asks again, then goes through
    page.fill("#prompt", "After rotation")
    page.press("#prompt", "Enter")
    dialog.wait_for(state="visible")
    assert page.inner_text("#key-message").startswith("The key was refused")
    page.fill("#key-input", "rotated")
    page.press("#key-input", "Enter")
    wait_turn(page.locator(".turn").nth(0))  # the reload started a new conversation
