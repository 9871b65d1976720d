"""Run-time reference trimming: a too_long failure carries its numbers, and the pipeline retries a request whose
references made it too long with the longest references cut first, recorded in the trace."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moa_local.config.recipe import FailurePolicy, FakeOptions, Recipe, Sampling
from moa_local.engines.base import DONE_TICKET, Generation, OnDelta, OnDone, Overflow, Request, Ticket
from moa_local.engines.fake import FakeEngine, count_references, default_responder, fake_pool
from moa_local.errors import PromptTooLongError
from moa_local.pipeline import Conversation, MoAPipeline, Result, Schedule, failure_error
from moa_local.pipeline.journal import response_from_dict
from moa_local.pipeline.trace import Trimmed
from moa_local.pipeline.trim import MAX_TRIMS, TRIM_MARKER, ReferenceTrim, water_fill


def _ask(engine: FakeEngine, request: Request) -> Generation:
    (gen,) = engine.generate([request])
    return gen


def test_a_too_long_failure_carries_its_numbers_and_keeps_its_message() -> None:
    engine = FakeEngine("m", options=FakeOptions(max_model_len=10))
    request = Request(messages=[{"role": "user", "content": "one two three four five six"}],
                      sampling=Sampling(max_tokens=5))
    gen = _ask(engine, request)
    assert gen.kind == "too_long" and gen.overflow == Overflow(prompt_tokens=6, max_tokens=5, max_model_len=10)
    assert gen.overflow.excess == 1
    assert gen.error == "prompt of 6 tokens + max_tokens 5 exceeds max_model_len 10 of 'm'"
    assert gen.usage.prompt_tokens == 6
    fits = _ask(engine, Request(messages=[{"role": "user", "content": "one two three four five"}],
                                sampling=Sampling(max_tokens=5)))
    assert fits.ok and fits.overflow is None


def test_the_vllm_worker_reply_keeps_the_numbers() -> None:
    from moa_local.engines.vllm import _generation

    gen = _generation({"text": None, "error": "prompt of 9 tokens ...", "prompt_tokens": 9, "completion_tokens": 0,
                       "seconds": 0.0, "finish_reason": None, "kind": "too_long",
                       "overflow": {"prompt_tokens": 9, "max_tokens": 4, "max_model_len": 8}})
    assert gen.kind == "too_long" and gen.overflow == Overflow(9, 4, 8) and gen.overflow.excess == 5
    plain = _generation({"text": "hi", "error": None, "prompt_tokens": 1, "completion_tokens": 1, "seconds": 0.0,
                         "finish_reason": "stop", "kind": None})
    assert plain.ok and plain.overflow is None


# -- the rule ------------------------------------------------------------------------------------------------------


def test_water_filling_cuts_the_longest_reference_first_and_keeps_heads() -> None:
    refs = ["a" * 100, "b" * 50, "c" * 10]
    one = water_fill(refs, 20)
    assert one is not None and one[1:] == refs[1:], "only the longest is cut while that frees enough"
    assert one[0] == "a" * 66 + TRIM_MARKER and 100 - len(one[0]) == 20
    both = water_fill(refs, 60)
    assert both == ["a" * 31 + TRIM_MARKER, "b" * 31 + TRIM_MARKER, "c" * 10], "cut down to a common length"
    assert sum(map(len, refs)) - sum(map(len, both)) >= 60
    assert water_fill(refs, 0) == refs
    assert water_fill(refs, 200) is None, "cutting all to their markers frees 86 + 36 characters, not 200"


def test_each_try_is_sized_from_the_new_failure_and_adds_to_the_cut() -> None:
    trim = ReferenceTrim(["x" * 1000, "y" * 100])
    trim.sent([{"role": "user", "content": "z" * 2000}])
    too_long = Generation.too_long(Overflow(prompt_tokens=500, max_tokens=100, max_model_len=590), model_id="m")
    assert trim.retry(too_long)  # 4 characters a token: (10 + 32) x 4 = 168 to cut
    assert len(trim.references[0]) == 1000 - 168 and trim.references[1] == "y" * 100
    assert trim.retry(too_long)  # still 10 over: 168 more, from the original references
    assert len(trim.references[0]) == 1000 - 336
    record = trim.record()
    assert record == Trimmed(references_chars_before=1100, references_chars_after=1100 - 336, attempts=2)
    assert not ReferenceTrim([]).retry(too_long), "a request without references is left as it is"
    assert not trim.retry(Generation.failed("prompt too long", kind="too_long")), "no numbers, no guess"


# -- through the pipeline --------------------------------------------------------------------------------------------

SMOL, GEMMA = "smollm2-135m-instruct", "gemma3-270m"


def _responder(request: Request, model_id: str) -> str:
    """Layer 1: a long answer from smollm2 (300 words), a short one from gemma3 (40); later: the default answer."""
    if count_references(request):
        return default_responder(request, model_id)
    prefix, count = ("s", 300) if model_id == SMOL else ("g", 40)
    return " ".join(f"{prefix}{i}" for i in range(count))


def _recipe(fake_recipe: Recipe, *, smol_context: int = 600) -> Recipe:
    """smollm2 (a proposer and the aggregator) holds ``smol_context`` words: layer 1 fits, layer 2 with the
    references does not. No retries, so a trimmed try cannot be counted as one."""
    sampling = {"temperature": 0.0, "max_tokens": 300}
    proposers = [p.model_copy(update={"sampling": p.sampling.model_copy(update=sampling)})
                 for p in fake_recipe.proposers]
    aggregator = fake_recipe.aggregator.model_copy(
        update={"sampling": fake_recipe.aggregator.sampling.model_copy(update={"max_tokens": 50})})
    smol = fake_recipe.engine_options(SMOL)
    engines = {SMOL: smol.model_copy(update={"fake": smol.fake.model_copy(update={"max_model_len": smol_context})})}
    return fake_recipe.model_copy(update={"proposers": proposers, "aggregator": aggregator, "engines": engines,
                                          "policy": FailurePolicy(min_proposers=1, retries=0)})


def _run(recipe: Recipe, schedule: Schedule, content: str) -> tuple[Result, dict[str, FakeEngine]]:
    pool = fake_pool(recipe, responder=_responder)
    (res,) = MoAPipeline(recipe, pool, schedule=schedule).run([Conversation("t", [{"role": "user", "content": content}])])
    return res, {m: e for m, e in pool.engines.items() if isinstance(e, FakeEngine)}


@pytest.mark.parametrize("schedule", ["flow", "stage"])
def test_references_too_long_for_an_engine_are_trimmed_and_the_answer_is_ok(fake_recipe: Recipe,
                                                                           schedule: Schedule) -> None:
    res, engines = _run(_recipe(fake_recipe), schedule, "Why is the sky blue?")
    assert res.ok, res.error
    assert res.output and "synthesized 2 references" in res.output
    smol_l2, gemma_l2 = res.layers[1].responses
    assert smol_l2.ok and smol_l2.attempts == 1, "a trimmed try is not a retry of the policy (retries: 0)"
    assert smol_l2.trimmed is not None and smol_l2.trimmed.attempts >= 1
    assert smol_l2.trimmed.references_chars_after < smol_l2.trimmed.references_chars_before
    assert gemma_l2.trimmed is None, "gemma3's engine has room: its references go whole"
    # What smollm2 was sent the last time in layer 2: the long reference cut, its head kept; the short one whole.
    # smollm2's requests with references: layer 2 (the whole ones that failed, then the trimmed try), the aggregator.
    sent = [r for r in engines[SMOL].requests if count_references(r) == 2]
    assert len(sent) == 2 + smol_l2.trimmed.attempts
    system = sent[-2].messages[0]["content"]
    long_ref, short_ref = res.layers[0].responses[0].text, res.layers[0].responses[1].text
    assert long_ref and short_ref and long_ref in sent[0].messages[0]["content"]
    assert f"1. {long_ref[:200]}" in system and long_ref not in system and TRIM_MARKER.strip() in system
    assert f"2. {short_ref}" in system, "the shorter reference is kept whole"
    fits = sum(len(m["content"].split()) for m in sent[-2].messages) + 300
    assert fits <= 600
    # The trace and the journal keep the record.
    trace = res.trace()
    recorded = trace["layers"][1]["responses"][0]["trimmed"]
    assert recorded == {"references_chars_before": smol_l2.trimmed.references_chars_before,
                        "references_chars_after": smol_l2.trimmed.references_chars_after,
                        "attempts": smol_l2.trimmed.attempts}
    assert "trimmed" not in trace["layers"][1]["responses"][1]
    assert response_from_dict(json.loads(json.dumps(smol_l2.to_dict()))).trimmed == smol_l2.trimmed


@pytest.mark.parametrize("schedule", ["flow", "stage"])
def test_a_user_prompt_too_long_without_references_still_fails_clearly(fake_recipe: Recipe,
                                                                      schedule: Schedule) -> None:
    res, _ = _run(_recipe(fake_recipe), schedule, " ".join(["word"] * 500))
    assert not res.ok and res.kind == "too_long"
    assert isinstance(failure_error(res), PromptTooLongError)
    assert "exceeds max_model_len 600 of 'smollm2-135m-instruct'" in (res.error or "")
    assert "the conversation itself is too long" in (res.error or "")
    smol_l1 = res.layers[0].responses[0]
    assert smol_l1.kind == "too_long" and "itself" not in (smol_l1.error or ""), "layer 1 has nothing to trim"
    smol_l2 = res.layers[1].responses[0]
    assert smol_l2.kind == "too_long" and "the conversation itself is too long" in (smol_l2.error or "")


@pytest.mark.parametrize("schedule", ["flow", "stage"])
def test_trimming_stops_after_max_trims(fake_recipe: Recipe, schedule: Schedule) -> None:
    """An engine that stays 1 token over however much is cut: MAX_TRIMS trimmed tries, then the failure stands."""
    recipe = _recipe(fake_recipe, smol_context=10_000)
    pool = fake_pool(recipe, responder=_responder)
    gemma = pool.engines[GEMMA]
    sent = []

    def submit(request: Request, *, on_done: OnDone, on_delta: OnDelta | None = None) -> Ticket:
        sent.append(request)
        if not count_references(request):
            on_done(Generation(text="short answer"))
        else:
            on_done(Generation.too_long(Overflow(900, 300, 1199), model_id=GEMMA))
        return DONE_TICKET

    gemma.submit = submit  # type: ignore[method-assign]
    (res,) = MoAPipeline(recipe, pool, schedule=schedule).run([Conversation("t", [{"role": "user", "content": "q"}])])
    assert res.ok
    gemma_l2 = res.layers[1].responses[1]
    assert gemma_l2.kind == "too_long" and f"still too long after {MAX_TRIMS} trims" in (gemma_l2.error or "")
    assert gemma_l2.trimmed is not None and gemma_l2.trimmed.attempts == MAX_TRIMS
    assert len(sent) == 1 + 1 + MAX_TRIMS, "layer 1, layer 2, then MAX_TRIMS trimmed tries"


def test_the_report_shows_a_trimmed_response(fake_recipe: Recipe, tmp_path: Path) -> None:
    from moa_local.view.payload import build_payload
    from moa_local.view.sources import read_source

    res, _ = _run(_recipe(fake_recipe), "flow", "Why is the sky blue?")
    out = tmp_path / "out.jsonl"
    out.write_text(json.dumps({"id": "t", "output": res.output, "error": None, "trace": res.trace()}) + "\n")
    (conv,) = build_payload(read_source(out))["convs"]
    layer2 = conv["t"][0][3][1]
    trimmed = res.layers[1].responses[0].trimmed
    assert trimmed is not None
    assert layer2[0][9] == [trimmed.references_chars_before, trimmed.references_chars_after, trimmed.attempts]
    assert len(layer2[1]) == 9, "a response whose references went whole has no trimming entry"


def test_the_server_role_done_event_carries_the_record() -> None:
    pytest.importorskip("fastapi")
    from moa_local.pipeline.scheduler import RoleEvent
    from moa_local.pipeline.trace import Response
    from moa_local.server.openai import role_event

    trimmed = Trimmed(references_chars_before=900, references_chars_after=400, attempts=1)
    done = RoleEvent("done", "c", 2, "p", "m", response=Response(role="p", model="m", text="t", trimmed=trimmed))
    assert role_event(done)["trimmed"] == {"references_chars_before": 900, "references_chars_after": 400,
                                           "attempts": 1}
    whole = RoleEvent("done", "c", 2, "p", "m", response=Response(role="p", model="m", text="t"))
    assert "trimmed" not in role_event(whole)
