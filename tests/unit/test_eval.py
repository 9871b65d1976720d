"""The eval runner, systems, bootstrap and report on the fake backend: scripted answers, resume, Self-MoA choice,
judges, and the files a run leaves behind."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from moa_local.config.recipe import Recipe, override_sampling
from moa_local.engines.base import Request
from moa_local.engines.fake import FakeEngine, fake_pool
from moa_local.errors import InputError
from moa_local.eval import build_systems, get_suite, parse_baselines, run_eval, self_moa_system, write_report
from moa_local.eval.bootstrap import bootstrap_mean, paired_difference
from moa_local.eval.report import build_report, render_markdown

ALL = ["proposers", "aggregator", "self-moa"]


def _last_user(request: Request) -> str:
    return next(m["content"] for m in reversed(request.messages) if m["role"] == "user")


def _math_oracle(limit: int, *, right: set[str] | None = None):  # type: ignore[no-untyped-def]
    """A responder that answers the math items correctly for the models in ``right`` (all when None)."""
    answers = {it.turns[0]: it.data["answer"] for it in get_suite("math").items(limit)}

    def respond(request: Request, model_id: str) -> str:
        question = next(q for q in answers if q in _last_user(request))
        ok = right is None or model_id in right
        return f"Some work with 3 and 4.\nAnswer: {answers[question] if ok else '-999999'}"

    return respond


def _engines(pool) -> dict[str, FakeEngine]:  # type: ignore[no-untyped-def]
    return pool.engines  # type: ignore[no-any-return]


def test_systems_and_self_moa_recipe(fake_recipe: Recipe) -> None:
    names = [s.name for s in build_systems(fake_recipe, ALL)]
    assert names == ["proposer:smollm2", "proposer:gemma3", "aggregator:smollm2-135m-instruct", "moa"]
    assert [s.name for s in build_systems(fake_recipe, [])] == ["moa"]
    gemma = fake_recipe.proposer_roles()[1]
    sm = self_moa_system(fake_recipe, gemma)
    assert sm.name == "self-moa:gemma3" and sm.recipe is not None
    roles = sm.recipe.proposer_roles()
    assert [r.model for r in roles] == ["gemma3-270m", "gemma3-270m"], "sampled as many times as there are proposers"
    assert len({r.sampling.seed for r in roles}) == 2, "distinct seeds per sample"
    assert sm.recipe.aggregator.model == "gemma3-270m" and sm.recipe.layers == fake_recipe.layers
    assert parse_baselines(None) == ALL and parse_baselines("none") == [] and parse_baselines("self-moa") == ["self-moa"]
    with pytest.raises(InputError, match="unknown baseline"):
        parse_baselines("proposers,oracle")


def _stages(engine: FakeEngine) -> dict[str, int]:
    """Requests per "stage/role" (the request id after the conversation id)."""
    return dict(Counter(r.request_id.split("/", 1)[1] for r in engine.requests))


def test_correct_fake_scores_one_for_every_system_and_files_are_written(fake_recipe: Recipe, tmp_path: Path) -> None:
    pool = fake_pool(fake_recipe, responder=_math_oracle(3))
    records = run_eval(get_suite("math"), fake_recipe, pool, output=tmp_path, baselines=ALL, limit=3)
    by_system: dict[str, list[float]] = {}
    for r in records:
        by_system.setdefault(r["system"], []).append(r["score"])
    assert set(by_system) == {"proposer:smollm2", "proposer:gemma3", "aggregator:smollm2-135m-instruct", "moa",
                              "self-moa:smollm2"}
    assert all(v == [1.0, 1.0, 1.0] for v in by_system.values())
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert len(lines) == 15 and len({json.loads(x)["id"] for x in lines}) == 15
    moa = next(r for r in records if r["system"] == "moa")
    assert len(moa["trace"][0]["layers"]) == 2 and moa["usage"]["completion_tokens"] > 0
    report = write_report(tmp_path)
    assert (tmp_path / "scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "report.md").read_text()
    assert "| **moa** |" in md and "100.0%" in md and "MoA − best single model" in md
    assert report.comparisons[0].diff is not None and report.comparisons[0].diff.mean == 0.0


def test_engines_are_shared_single_systems_send_one_request_per_item(fake_recipe: Recipe, tmp_path: Path) -> None:
    pool = fake_pool(fake_recipe, responder=_math_oracle(4))
    run_eval(get_suite("math"), fake_recipe, pool, output=tmp_path, baselines=["proposers", "aggregator"], limit=4,
             chunk_size=4)
    smol, gemma = _engines(pool)["smollm2-135m-instruct"], _engines(pool)["gemma3-270m"]
    # smollm2: proposer alone (4), aggregator alone (4), MoA layer 1, layer 2, aggregator (4 each).
    assert _stages(smol) == {"single/smollm2": 4, "single/aggregator": 4, "L1/smollm2": 4, "L2/smollm2": 4,
                             "agg/aggregator": 4}
    assert _stages(gemma) == {"single/gemma3": 4, "L1/gemma3": 4, "L2/gemma3": 4}
    alone = next(r for r in smol.requests if "/single/smollm2" in r.request_id)
    moa_layer1 = next(r for r in smol.requests if "/L1/" in r.request_id and r.messages == alone.messages)
    assert alone.sampling == moa_layer1.sampling, "a proposer alone gets exactly its MoA layer-1 request"


def test_proposers_from_moa_reuse_layer_one_and_send_no_extra_request(fake_recipe: Recipe, tmp_path: Path) -> None:
    pool = fake_pool(fake_recipe, responder=_math_oracle(4, right={"gemma3-270m"}))
    records = run_eval(get_suite("math"), fake_recipe, pool, output=tmp_path, baselines=ALL, limit=4, chunk_size=2,
                       proposers_from_moa=True)
    smol, gemma = _engines(pool)["smollm2-135m-instruct"], _engines(pool)["gemma3-270m"]
    # gemma: MoA's two layers, then Self-MoA of gemma (2 samples per layer, its aggregator); no proposer-alone
    # request. smollm2: MoA layers 1-2 and aggregator, and the aggregator alone.
    assert _stages(gemma) == {"L1/gemma3": 4, "L2/gemma3": 4, "L1/gemma3#1": 4, "L1/gemma3#2": 4, "L2/gemma3#1": 4,
                              "L2/gemma3#2": 4, "agg/aggregator": 4}
    assert _stages(smol) == {"L1/smollm2": 4, "L2/smollm2": 4, "agg/aggregator": 4, "single/aggregator": 4}
    by = {(r["system"], r["item"]): r for r in records}
    assert len(records) == 4 * 5
    for item in {r["item"] for r in records}:
        layer1 = {x["role"]: x for x in by[("moa", item)]["trace"][0]["layers"][0]["responses"]}
        for role in ("smollm2", "gemma3"):
            row = by[(f"proposer:{role}", item)]
            assert row["answers"] == [layer1[role]["text"]] and row["derived_from"] == "moa layer 1"
            assert row["usage"] == layer1[role]["usage"]
    assert all(by[("proposer:gemma3", i)]["score"] == 1.0 for i in {r["item"] for r in records})
    assert any(r["system"] == "self-moa:gemma3" for r in records), "Self-MoA waited for MoA's layer-1 scores"
    # Resume: MoA rows present, proposer rows lost -> rebuilt from the trace, no engine call.
    path = tmp_path / "results.jsonl"
    kept = [x for x in path.read_text().splitlines() if not json.loads(x)["system"].startswith("proposer:")]
    path.write_text("\n".join(kept) + "\n")
    pool2 = fake_pool(fake_recipe, responder=_math_oracle(4))
    again = run_eval(get_suite("math"), fake_recipe, pool2, output=tmp_path, baselines=ALL, limit=4,
                     proposers_from_moa=True)
    assert len(again) == 20 and all(not e.requests for e in _engines(pool2).values())
    assert "MoA's own layer-1 answers" in render_markdown(build_report(tmp_path))
    with pytest.raises(InputError, match="single-turn"):
        run_eval(get_suite("mtbench"), fake_recipe, pool2, output=tmp_path / "mt", baselines=ALL, limit=1,
                 judge="smollm2-135m-instruct", proposers_from_moa=True)


def test_self_moa_uses_the_best_proposer_of_the_run(fake_recipe: Recipe, tmp_path: Path) -> None:
    pool = fake_pool(fake_recipe, responder=_math_oracle(4, right={"gemma3-270m"}))
    records = run_eval(get_suite("math"), fake_recipe, pool, output=tmp_path, baselines=ALL, limit=4, chunk_size=2)
    scores = {r["system"]: r["score"] for r in records}
    assert "self-moa:gemma3" in scores and "self-moa:smollm2" not in scores
    assert scores["proposer:gemma3"] == 1.0 and scores["proposer:smollm2"] == 0.0
    report = build_report(tmp_path)
    best = report.best_single()
    assert best is not None and best.name == "proposer:gemma3"
    moa_vs_best = report.comparisons[0]
    assert moa_vs_best.b == "proposer:gemma3" and moa_vs_best.diff is not None
    assert moa_vs_best.diff.mean == -1.0 and moa_vs_best.diff.high == -1.0, "smollm2 aggregates: MoA is always wrong"


def test_rerun_resumes_and_skips_done_pairs(fake_recipe: Recipe, tmp_path: Path) -> None:
    suite = get_suite("math")
    run_eval(suite, fake_recipe, fake_pool(fake_recipe, responder=_math_oracle(4)), output=tmp_path,
             baselines=ALL, limit=2)
    path = tmp_path / "results.jsonl"
    with path.open("a") as fh:
        fh.write('{"id": "moa|torn", "sys')  # a line torn by a kill
    pool = fake_pool(fake_recipe, responder=_math_oracle(4))
    records = run_eval(suite, fake_recipe, pool, output=tmp_path, baselines=ALL, limit=4)
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    assert len(rows) == 20 == len(records) and len({r["id"] for r in rows}) == 20
    asked = [_last_user(r) for r in _engines(pool)["gemma3-270m"].requests]
    firsts = [it.turns[0] for it in suite.items(2)]
    assert not any(q in a for a in asked for q in firsts), "items already done are not asked again"
    # Nothing left: a third run sends no request at all.
    pool3 = fake_pool(fake_recipe, responder=_math_oracle(4))
    run_eval(suite, fake_recipe, pool3, output=tmp_path, baselines=ALL, limit=4)
    assert all(not e.requests for e in _engines(pool3).values())


def test_a_folder_of_another_suite_is_refused(fake_recipe: Recipe, tmp_path: Path) -> None:
    run_eval(get_suite("math"), fake_recipe, fake_pool(fake_recipe), output=tmp_path, baselines=[], limit=1)
    with pytest.raises(InputError, match="holds results of suite 'math'"):
        run_eval(get_suite("humaneval"), fake_recipe, fake_pool(fake_recipe), output=tmp_path, baselines=[], limit=1)


def test_failures_are_recorded_and_scored_zero(fake_recipe: Recipe, tmp_path: Path) -> None:
    failing = Recipe.model_validate(
        {**fake_recipe.model_dump(), "engines": {"gemma3-270m": {"fake": {"fail_if_contains": "Calculate"}}}})
    records = run_eval(get_suite("math"), failing, fake_pool(failing), output=tmp_path, baselines=["proposers"], limit=2)
    gemma = [r for r in records if r["system"] == "proposer:gemma3"]
    arithmetic = next(r for r in gemma if r["item"].startswith("basic_arithmetic"))
    assert arithmetic["score"] == 0.0 and "fake failure" in arithmetic["errors"][0] and arithmetic["answers"] == [None]
    report = build_report(tmp_path)
    row = report.row("proposer:gemma3")
    assert row is not None and row.failed == 1


def test_humaneval_with_canonical_responder_scores_one(fake_recipe: Recipe, tmp_path: Path) -> None:
    problems = {it.data["prompt"]: it.data for it in get_suite("humaneval").items(3)}

    def respond(request: Request, model_id: str) -> str:
        p = next(v for k, v in problems.items() if k in _last_user(request))
        return f"Sure:\n```python\n{p['prompt']}{p['canonical_solution']}```\nThat is all."

    recipe = override_sampling(fake_recipe, max_tokens=4000)  # the fake cuts answers at max_tokens words
    records = run_eval(get_suite("humaneval"), recipe, fake_pool(recipe, responder=respond),
                       output=tmp_path, baselines=ALL, limit=3)
    assert len(records) == 15 and all(r["score"] == 1.0 for r in records)


def _judge_responder(rating: str):  # type: ignore[no-untyped-def]
    def respond(request: Request, model_id: str) -> str:
        system = request.messages[0]["content"] if request.messages[0]["role"] == "system" else ""
        if "impartial judge" in system or "[Instruction]" in _last_user(request):
            return f"Fine. Rating: {rating}"
        return f"[{model_id}] an answer to: {_last_user(request)[:30]}"

    return respond


def test_mtbench_two_turns_and_the_judge(fake_recipe: Recipe, tmp_path: Path) -> None:
    pool = fake_pool(fake_recipe, responder=_judge_responder("[[8]]"))
    records = run_eval(get_suite("mtbench"), fake_recipe, pool, output=tmp_path, baselines=ALL, limit=3,
                       judge="smollm2-135m-instruct")
    assert len(records) == 15
    assert all(r["score"] == 8.0 and len(r["answers"]) == 2 and len(r["judgments"]) == 2 for r in records)
    moa = next(r for r in records if r["system"] == "moa")
    turn2 = moa["trace"][1]["aggregator"]
    assert turn2 is not None and moa["answers"][1] == turn2["text"]
    # Turn 2 of the aggregator-alone system saw its own turn-1 answer.
    agg_calls = [r for r in _engines(pool)["smollm2-135m-instruct"].requests
                 if len(r.messages) == 3 and r.messages[1]["role"] == "assistant"]
    assert agg_calls
    report = build_report(tmp_path)
    assert report.scale == (1.0, 10.0) and "8.00" in render_markdown(report)


def test_judge_suites_require_a_judge(fake_recipe: Recipe, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="--judge"):
        run_eval(get_suite("mtbench"), fake_recipe, fake_pool(fake_recipe), output=tmp_path, baselines=[], limit=1)


def test_unparseable_verdicts_are_unscored_not_zero(fake_recipe: Recipe, tmp_path: Path) -> None:
    pool = fake_pool(fake_recipe, responder=_judge_responder("[[12]]"))
    records = run_eval(get_suite("mtbench"), fake_recipe, pool, output=tmp_path, baselines=[], limit=2,
                       judge="smollm2-135m-instruct")
    assert all(r["score"] is None for r in records)
    report = write_report(tmp_path)
    assert report.rows[0].interval is None and "| 0 / 2 |" in (tmp_path / "report.md").read_text()


def _alpaca_judge(request: Request, model_id: str) -> str:
    """Prefers whichever output came from a fake model (its answers start with '[')."""
    text = _last_user(request)
    if "Best Model Identifier" not in text:
        return f"[{model_id}] my answer"
    outputs = re.findall(r'"output": """(.*?)"""', text, flags=re.DOTALL)
    return "m" if outputs[0].startswith("[") else "M"


def test_alpacaeval_against_gpt4_and_against_a_system(fake_recipe: Recipe, tmp_path: Path) -> None:
    records = run_eval(get_suite("alpacaeval"), fake_recipe, fake_pool(fake_recipe, responder=_alpaca_judge),
                       output=tmp_path / "gpt4", baselines=["proposers"], limit=3, judge="smollm2-135m-instruct")
    assert all(r["score"] == 1.0 for r in records) and all(len(r["judgments"]) == 2 for r in records)
    records = run_eval(get_suite("alpacaeval"), fake_recipe, fake_pool(fake_recipe, responder=_alpaca_judge),
                       output=tmp_path / "vs", baselines=["proposers"], limit=3, judge="smollm2-135m-instruct",
                       reference="proposer:gemma3")
    ref = [r for r in records if r["system"] == "proposer:gemma3"]
    assert [r["score"] for r in ref] == [None] * 3 and all(r["details"]["is_reference"] for r in ref)
    others = [r for r in records if r["system"] != "proposer:gemma3"]
    assert all(r["score"] == 0.5 for r in others), "both outputs look alike to this judge: it picks m, then m"
    with pytest.raises(InputError, match="not a system of this run"):
        run_eval(get_suite("alpacaeval"), fake_recipe, fake_pool(fake_recipe), output=tmp_path / "x",
                 baselines=[], limit=1, judge="smollm2-135m-instruct", reference="proposer:nobody")


def test_bootstrap_intervals() -> None:
    iv = bootstrap_mean([1.0] * 10)
    assert (iv.mean, iv.low, iv.high, iv.n) == (1.0, 1.0, 1.0, 10)
    coin = bootstrap_mean([0.0, 1.0] * 50)
    assert coin.low < 0.5 < coin.high and coin.low > 0.35 and coin.high < 0.65
    assert bootstrap_mean([0.0, 1.0] * 50) == coin, "seeded: the same interval every time"
    same = paired_difference([0.0, 1.0] * 20, [0.0, 1.0] * 20)
    assert same.mean == 0.0 and same.p_not_better == 1.0
    better = paired_difference([1.0] * 30 + [0.0] * 10, [0.0] * 30 + [0.0] * 10)
    assert better.low > 0 and better.p_not_better == 0.0
    # Pairing matters: equal means per system, but a consistent per-item gain shows up only when paired.
    with pytest.raises(ValueError):
        paired_difference([1.0], [1.0, 0.0])
    with pytest.raises(ValueError):
        bootstrap_mean([])


def test_systems_on_disjoint_engines_run_at_the_same_time(fake_recipe: Recipe, tmp_path: Path) -> None:
    import threading

    barrier = threading.Barrier(2, timeout=10)  # both proposers alone must be generating at once to pass it

    def respond(request: Request, model_id: str) -> str:
        if "/single/" in request.request_id and "aggregator" not in request.request_id:
            barrier.wait()
        return "Answer: 1"

    records = run_eval(get_suite("math"), fake_recipe, fake_pool(fake_recipe, responder=respond), output=tmp_path,
                       baselines=ALL, limit=1)
    assert len(records) == 5 and not barrier.broken


def test_unseeded_recipe_gives_unseeded_self_moa_samples(fake_recipe: Recipe) -> None:
    unseeded = Recipe.model_validate({**fake_recipe.model_dump(), "proposers": [
        {**r.model_dump(), "sampling": {**r.sampling.model_dump(), "seed": None}} for r in fake_recipe.proposers]})
    sm = self_moa_system(unseeded, unseeded.proposer_roles()[0])
    assert sm.recipe is not None
    roles = sm.recipe.proposer_roles()
    assert [r.name for r in roles] == ["smollm2#1", "smollm2#2"] and all(r.sampling.seed is None for r in roles)


def test_a_dead_engine_stops_the_run_without_writing_its_failures(fake_recipe: Recipe, tmp_path: Path) -> None:
    from moa_local.errors import EngineDiedError

    pool = fake_pool(fake_recipe, responder=_math_oracle(4))
    _engines(pool)["gemma3-270m"].close()  # its generate now raises EngineDiedError: the engine is gone
    with pytest.raises(EngineDiedError, match="gemma3-270m died"):
        run_eval(get_suite("math"), fake_recipe, pool, output=tmp_path, baselines=["proposers"], limit=2)
    path = tmp_path / "results.jsonl"
    assert not path.exists() or path.read_text() == "", "no failure records that a resume would skip"
