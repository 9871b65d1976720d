"""The MoA pipeline's logic on the fake backend: layers, batching, references, multi-turn, failure policy."""

from __future__ import annotations

import pytest

from moa_local.api import MoA, load
from moa_local.config.recipe import FailurePolicy, FakeOptions, Recipe
from moa_local.engines.fake import FakeEngine, count_references, fake_pool
from moa_local.errors import InputError
from moa_local.pipeline import Conversation, MoAPipeline


def _engines(pool) -> dict[str, FakeEngine]:  # type: ignore[no-untyped-def]
    return pool.engines  # type: ignore[no-any-return]


def test_each_layer_is_one_batch_per_model(fake_recipe: Recipe) -> None:
    pool = fake_pool(fake_recipe)
    results = MoAPipeline(fake_recipe, pool).run([Conversation(str(i), [{"role": "user", "content": f"q{i}"}]) for i in range(5)])
    assert all(r.ok for r in results)
    smol, gemma = _engines(pool)["smollm2-135m-instruct"], _engines(pool)["gemma3-270m"]
    # smollm2 proposes in 2 layers and aggregates: 3 calls; each layer call carries all 5 conversations.
    assert [len(c) for c in smol.calls] == [5, 5, 5]
    assert [len(c) for c in gemma.calls] == [5, 5]


def test_references_flow_from_layer_to_layer(fake_recipe: Recipe) -> None:
    pool = fake_pool(fake_recipe)
    (res,) = MoAPipeline(fake_recipe, pool).run([Conversation("a", [{"role": "user", "content": "Why?"}])])
    gemma = _engines(pool)["gemma3-270m"]
    assert count_references(gemma.calls[0][0]) == 0
    assert count_references(gemma.calls[1][0]) == 2
    layer1 = [r.text for r in res.layers[0].responses]
    system = gemma.calls[1][0].messages[0]["content"]
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
    agg_request = _engines(pool)["smollm2-135m-instruct"].calls[-1][0]
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
    assert len(_engines(pool)["gemma3-270m"].calls) == 6  # 3 attempts x 2 layers
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


def test_aggregator_failure_is_an_error_not_a_silent_empty_answer(fake_recipe: Recipe) -> None:
    recipe = _failing_recipe(fake_recipe, min_proposers=1, retries=1)

    pool = fake_pool(recipe)
    agg = _engines(pool)["smollm2-135m-instruct"]
    original = agg.generate

    def generate(requests):  # type: ignore[no-untyped-def]
        gens = original(requests)
        if any(r.request_id.endswith("/agg/aggregator") for r in requests):
            from moa_local.engines.base import Generation

            return [Generation.failed("engine exploded") for _ in requests]
        return gens

    agg.generate = generate  # type: ignore[method-assign]
    (res,) = MoAPipeline(recipe, pool).run([Conversation("x", [{"role": "user", "content": "q"}])])
    assert not res.ok and "aggregator 'aggregator' failed: engine exploded" in (res.error or "")
    assert res.aggregator is not None and res.aggregator.attempts == 2


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
