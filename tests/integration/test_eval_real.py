"""The eval runner on the real tiny models (transformers backend, CPU): the math suite, 4 items, every system of
the tiny recipe on one pool of real engines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moa_local.api import start_engines
from moa_local.config import load_model_config, load_recipe
from moa_local.config.recipe import override_sampling
from moa_local.eval import get_suite, run_eval, write_report
from moa_local.eval.math import extract_final_answer
from moa_local.models import is_prepared

pytestmark = pytest.mark.integration

MAX_TOKENS = 24


def test_math_on_the_tiny_recipe_with_real_engines(tmp_path: Path) -> None:
    recipe = override_sampling(load_recipe("tiny"), max_tokens=MAX_TOKENS)
    for model_id in recipe.model_ids():
        if not is_prepared(load_model_config(model_id)):
            pytest.skip(f"{model_id} not prepared: run `moa-local models prepare`")
    starts: list[str] = []
    runner, _ = start_engines(recipe, backend="transformers", log=starts.append)
    with runner as pool:
        records = run_eval(get_suite("math"), recipe, pool, output=tmp_path, limit=4, chunk_size=4,
                           baselines=["proposers", "aggregator", "self-moa"])
    assert all(" ".join(starts).count(m) == 1 for m in recipe.model_ids()), "one engine per model for all systems"
    systems = {r["system"] for r in records}
    assert {"moa", "proposer:smollm2", "proposer:gemma3", "aggregator:smollm2-135m-instruct"} <= systems
    assert len(systems) == 5 and len(records) == 20
    self_moa = next(s for s in systems if s.startswith("self-moa:"))
    assert self_moa in ("self-moa:smollm2", "self-moa:gemma3")
    for r in records:
        assert r["errors"] == [None], r
        assert r["answers"][0] and r["answers"][0].strip(), f"{r['system']} answered nothing on {r['item']}"
        assert r["score"] in (0.0, 1.0)
        assert r["details"]["extracted"] == extract_final_answer(r["answers"][0])
    for r in records:
        if r["family"] in ("proposer", "aggregator"):
            assert 0 < r["usage"]["completion_tokens"] <= MAX_TOKENS
    moa = [r for r in records if r["system"] == "moa"]
    for r in moa:
        layers = r["trace"][0]["layers"]
        assert len(layers) == 2 and all(len(layer["responses"]) == 2 for layer in layers)
        # Layer 2 and the aggregator read the references, so their prompts are longer than layer 1's.
        first = sum(x["usage"]["prompt_tokens"] for x in layers[0]["responses"])
        second = sum(x["usage"]["prompt_tokens"] for x in layers[1]["responses"])
        assert second > first
        assert r["usage"]["completion_tokens"] <= 5 * MAX_TOKENS
    report = write_report(tmp_path)
    assert report.row("moa") is not None and (tmp_path / "scores.png").stat().st_size > 1000
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert len(lines) == 20 and all(json.loads(x)["recipe"] == "tiny" for x in lines)
