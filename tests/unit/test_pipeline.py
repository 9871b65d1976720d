"""The MoA pipeline's logic on the fake backend: layers, references, multi-turn, failure policy, under both schedules."""

from __future__ import annotations

import pytest

from moa_local.api import MoA, load
from moa_local.config.recipe import FailurePolicy, FakeOptions, Recipe
from moa_local.engines.base import DONE_TICKET, Generation
from moa_local.engines.fake import FakeEngine, count_references, fake_pool
from moa_local.errors import InputError
from moa_local.pipeline import Conversation, MoAPipeline, Result, Schedule


def _engines(pool) -> dict[str, FakeEngine]:  # type: ignore[no-untyped-def]
    return pool.engines  # type: ignore[no-any-return]


@pytest.mark.parametrize("schedule", ["flow", "stage"])
def test_every_role_answers_every_conversation_once(fake_recipe: Recipe, schedule: Schedule) -> None:
    pool = fake_pool(fake_recipe)
    pipeline = MoAPipeline(fake_recipe, pool, schedule=schedule)
    results = pipeline.run([Conversation(str(i), [{"role": "user", "content": f"q{i}"}]) for i in range(5)])
    assert all(r.ok for r in results) and [r.id for r in results] == ["0", "1", "2", "3", "4"]
    smol, gemma = _engines(pool)["smollm2-135m-instruct"], _engines(pool)["gemma3-270m"]
    # smollm2 proposes in 2 layers and aggregates; gemma proposes in 2 layers
    assert len(smol.requests) == 15 and len(gemma.requests) == 10
    stages = sorted(r.request_id.split("/")[1] for r in smol.requests)
    assert stages == ["L1"] * 5 + ["L2"] * 5 + ["agg"] * 5


def test_both_schedules_give_the_same_answers(fake_recipe: Recipe) -> None:
    convs = [Conversation(str(i), [{"role": "user", "content": f"question {i}"}]) for i in range(7)]
    flow = MoAPipeline(fake_recipe, fake_pool(fake_recipe), schedule="flow").run(convs)
    stage = MoAPipeline(fake_recipe, fake_pool(fake_recipe), schedule="stage").run(convs)
    assert [r.output for r in flow] == [r.output for r in stage] and all(r.output for r in flow)

    def texts(r: Result) -> list[str | None]:
        return [x.text for layer in r.layers for x in layer.responses]

    assert [texts(r) for r in flow] == [texts(r) for r in stage]


def test_references_flow_from_layer_to_layer(fake_recipe: Recipe) -> None:
    pool = fake_pool(fake_recipe)
    (res,) = MoAPipeline(fake_recipe, pool).run([Conversation("a", [{"role": "user", "content": "Why?"}])])
    gemma = _engines(pool)["gemma3-270m"]
    assert count_references(gemma.requests[0]) == 0
    assert count_references(gemma.requests[1]) == 2
    layer1 = [r.text for r in res.layers[0].responses]
    system = gemma.requests[1].messages[0]["content"]
    assert all(t and t in system for t in layer1), "layer 2 sees every layer-1 answer"
    assert res.output and "synthesized 2 references" in res.output
    assert len(res.layers) == 2 and [r.role for r in res.layers[1].responses] == ["smollm2", "gemma3"]
    assert res.aggregator is not None and res.aggregator.role == "aggregator"


def test_trace_has_the_documented_keys(fake_recipe: Recipe) -> None:
    (res,) = MoAPipeline(fake_recipe, fake_pool(fake_recipe)).run([Conversation("a", [{"role": "user", "content": "x"}])])
    t = res.trace()
    assert set(t) >= {"output", "layers", "aggregator"}
    assert set(t["layers"][0]["responses"][0]) >= {"model", "text", "error", "usage", "seconds"}
    assert res.usage.completion_tokens == sum(r.usage.completion_tokens for layer in res.layers for r in layer.responses) + res.aggregator.usage.completion_tokens  # type: ignore[union-attr]


def test_multi_turn_history_is_kept_and_references_answer_the_last_turn(fake_recipe: Recipe) -> None:
    pool = fake_pool(fake_recipe)
    history = [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another one?"},
    ]
    (res,) = MoAPipeline(fake_recipe, pool).run([Conversation("m", history)])
    agg_request = _engines(pool)["smollm2-135m-instruct"].requests[-1]
    assert agg_request.messages[1:] == history[1:]
    assert agg_request.messages[0]["content"].startswith("Be kind.\n\n")
    assert "Another one?" in (res.output or "")


def _failing_recipe(fake_recipe: Recipe, *, min_proposers: int, retries: int) -> Recipe:
    return fake_recipe.model_copy(update={"policy": FailurePolicy(min_proposers=min_proposers, retries=retries)})


def test_failed_proposer_is_recorded_and_the_layer_goes_on(fake_recipe: Recipe) -> None:
    recipe = _failing_recipe(fake_recipe, min_proposers=1, retries=2)
    pool = fake_pool(recipe)
    _engines(pool)["gemma3-270m"].options = FakeOptions(fail_if_contains="boom")
    (res,) = MoAPipeline(recipe, pool).run([Conversation("x", [{"role": "user", "content": "boom"}])])
    assert res.ok, res.error
    gemma = res.layers[0].responses[1]
    assert not gemma.ok and "boom" in (gemma.error or "") and gemma.attempts == 3
    assert len(_engines(pool)["gemma3-270m"].requests) == 6  # 3 attempts x 2 layers
    assert "synthesized 1 references" in (res.output or "")


def test_below_min_proposers_fails_that_conversation_only(fake_recipe: Recipe) -> None:
    recipe = _failing_recipe(fake_recipe, min_proposers=2, retries=0)
    pool = fake_pool(recipe)
    _engines(pool)["gemma3-270m"].options = FakeOptions(fail_if_contains="boom")
    good, bad = MoAPipeline(recipe, pool).run(
        [Conversation("good", [{"role": "user", "content": "fine"}]), Conversation("bad", [{"role": "user", "content": "boom"}])]
    )
    assert good.ok and good.output
    assert not bad.ok and bad.output is None
    assert "layer 1: only 1 of 2 proposers answered (min_proposers=2)" in (bad.error or "")
    assert len(bad.layers) == 1, "a failed conversation stops after the failing layer"


@pytest.mark.parametrize("schedule", ["flow", "stage"])
def test_aggregator_failure_is_an_error_not_a_silent_empty_answer(fake_recipe: Recipe, schedule: Schedule) -> None:
    recipe = _failing_recipe(fake_recipe, min_proposers=1, retries=1)

    pool = fake_pool(recipe)
    agg = _engines(pool)["smollm2-135m-instruct"]
    original = agg.submit

    def submit(request, *, on_done, on_delta=None):  # type: ignore[no-untyped-def]
        if request.request_id.endswith("/agg/aggregator"):
            on_done(Generation.failed("engine exploded"))
            return DONE_TICKET
        return original(request, on_done=on_done, on_delta=on_delta)

    agg.submit = submit  # type: ignore[method-assign]
    (res,) = MoAPipeline(recipe, pool, schedule=schedule).run([Conversation("x", [{"role": "user", "content": "q"}])])
    assert not res.ok and "aggregator 'aggregator' failed: engine exploded" in (res.error or "")
    assert res.aggregator is not None and res.aggregator.attempts == 2 and res.kind == "failed"


def test_deterministic_failures_are_not_retried(fake_recipe: Recipe) -> None:
    recipe = _failing_recipe(fake_recipe, min_proposers=1, retries=3)
    pool = fake_pool(recipe)
    gemma = _engines(pool)["gemma3-270m"]
    calls = []

    def submit(request, *, on_done, on_delta=None):  # type: ignore[no-untyped-def]
        calls.append(request)
        on_done(Generation.failed("prompt too long", kind="too_long"))
        return DONE_TICKET

    gemma.submit = submit  # type: ignore[method-assign]
    (res,) = MoAPipeline(recipe, pool).run([Conversation("x", [{"role": "user", "content": "q"}])])
    assert res.ok and res.layers[0].responses[1].kind == "too_long"
    assert len(calls) == 2, "one attempt per layer: a too-long prompt fails the same way every time"


def test_flow_sends_a_conversations_next_layer_without_waiting_for_the_others(fake_recipe: Recipe) -> None:
    """No barrier: conversation 0's layer 2 goes out while conversation 1's layer 1 is still running."""
    recipe = fake_recipe.model_copy(update={"engines": {
        "smollm2-135m-instruct": fake_recipe.engine_options("smollm2-135m-instruct"),
        "gemma3-270m": fake_recipe.engine_options("gemma3-270m"),
    }})
    pool = fake_pool(recipe)
    gemma = _engines(pool)["gemma3-270m"]
    gemma.options = FakeOptions(token_delay_s=0.002)
    slow = {"1"}  # conversation 1's gemma answers take 40x longer

    original = gemma.submit

    def submit(request, *, on_done, on_delta=None):  # type: ignore[no-untyped-def]
        conv = request.request_id.split("/")[0]
        gemma.options = FakeOptions(token_delay_s=0.2 if conv in slow else 0.001)
        return original(request, on_done=on_done, on_delta=on_delta)

    gemma.submit = submit  # type: ignore[method-assign]
    order: list[tuple[str, int]] = []
    MoAPipeline(recipe, pool, schedule="flow").run(
        [Conversation(str(i), [{"role": "user", "content": f"q{i}"}]) for i in range(2)],
        listener=lambda e: order.append((e.conversation, e.layer)) if e.kind == "start" and e.model != "gemma3-270m" else None,
    )
    assert order.index(("0", 3)) < order.index(("1", 2)), "conversation 0 reached its aggregator first"


def test_flow_window_bounds_conversations_in_flight(fake_recipe: Recipe) -> None:
    pool = fake_pool(fake_recipe)
    for engine in _engines(pool).values():
        engine.options = FakeOptions(latency_s=0.01)
    live: set[str] = set()
    peak = [0]

    def watch(event):  # type: ignore[no-untyped-def]
        if event.kind == "start" and event.layer == 1:
            live.add(event.conversation)
            peak[0] = max(peak[0], len(live))
        if event.kind == "done" and event.aggregator:
            live.discard(event.conversation)

    results = MoAPipeline(fake_recipe, pool, window=3).run(
        [Conversation(str(i), [{"role": "user", "content": f"q{i}"}]) for i in range(12)], listener=watch)
    assert all(r.ok for r in results) and peak[0] == 3


def test_api_load_run_and_close() -> None:
    with load("fake") as moa:
        assert isinstance(moa, MoA) and moa.backend == "fake"
        results = moa.run(["one", [{"role": "user", "content": "two"}]])
        assert [r.id for r in results] == ["0", "1"] and all(r.output for r in results)
        assert "".join(moa.stream("three")).startswith("[smollm2-135m-instruct]")
        engines = list(moa.runner.engines.values())  # type: ignore[attr-defined]
    assert all(e.closed for e in engines)


def test_greedy_fake_is_deterministic() -> None:
    with load("fake", temperature=0.0) as moa:
        a = moa.run(["same"])[0].output
        b = moa.run(["same"])[0].output
    assert a == b


@pytest.mark.parametrize(
    "bad",
    ["", "   ", [], [{"role": "user"}], [{"role": "robot", "content": "x"}], [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]],
)
def test_bad_prompts_are_rejected_before_running(bad: object) -> None:
    with load("fake") as moa, pytest.raises(InputError):
        moa.run([bad])  # type: ignore[list-item]
