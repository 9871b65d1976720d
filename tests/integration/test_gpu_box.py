"""The paper's recipes end to end on the simulated GPU server: the real planner, the real phased runner, real
worker processes running the real VLLMHost, with moa_local.gpusim's stand-in vllm enforcing vLLM 0.32's CUDA rules
on one shared memory ledger.

Each scenario asserts: every engine starts on its planned GPUs (its worker's CUDA_VISIBLE_DEVICES), no GPU is ever
over its memory (every allocation and the ledger's peaks), every request is answered, and a second pass after the
engines slept, woke or reloaded gives the same greedy answers. About 40-60 s a scenario (each worker imports
transformers; engines of a GPU phase start one after another).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from moa_local.config import load_model_config, load_recipe
from moa_local.config.recipe import Recipe
from moa_local.gpusim import ENV, Box
from moa_local.gpusim.weights import make_weights
from moa_local.pipeline import Conversation, MoAPipeline
from moa_local.placement import build_hardware, plan_recipe
from moa_local.placement.phases import start_runner

pytestmark = pytest.mark.integration

GIB = 1024**3
QUESTIONS = [Conversation("sky", [{"role": "user", "content": "Why is the sky blue? Answer in one sentence."}])]


def greedy(recipe: Recipe, *, quantization: str | None = None) -> Recipe:
    """The recipe with greedy sampling and short answers (the plan is made for the original)."""
    data = recipe.model_dump()
    for role in [*data["proposers"], data["aggregator"]]:
        role["sampling"].update(temperature=0.0, max_tokens=256)
    data["engines"] = {m: {**recipe.engine_options(m).model_dump(exclude_defaults=True),
                           **({"quantization": quantization} if quantization else {})} for m in recipe.model_ids()}
    return Recipe.model_validate(data)


def quantized(recipe: Recipe, quantization: str | None) -> Recipe:
    if not quantization:
        return recipe
    engines = {m: recipe.engine_options(m).model_copy(update={"quantization": quantization})
               for m in recipe.model_ids()}
    return recipe.model_copy(update={"engines": engines})


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("MOA_LOCAL_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    yield tmp_path


def run_on_box(home: Path, monkeypatch: pytest.MonkeyPatch, recipe_name: str, cards: str, *,
               quantization: str | None = None, cpu_memory: str = "1TiB",
               no_generation_config: tuple[str, ...] = (), passes: int = 2) -> tuple[Box, Any, list[list[str | None]]]:
    """Plan ``recipe_name`` on ``cards``, build the box and the weights, run two greedy passes; returns the box, the
    plan and each pass's outputs."""
    original = quantized(load_recipe(recipe_name), quantization)
    plan = plan_recipe(original, build_hardware(gpus=cards, cpu_memory=cpu_memory, cpu_cores=16, detect=False),
                       backend="vllm")
    box = Box.create(home / "box", cards)
    monkeypatch.setenv(ENV, str(box.path))
    for model_id in original.model_ids():
        make_weights(load_model_config(model_id), home / "home" / "models" / model_id,
                     quantization="awq" if quantization == "awq" else None,
                     generation_config=model_id not in no_generation_config)
    recipe = greedy(original, quantization=quantization)
    outputs: list[list[str | None]] = []
    with start_runner(recipe, plan, backend="vllm", log=lambda _: None) as runner:
        pipeline = MoAPipeline(recipe, runner)
        for _ in range(passes):
            results = pipeline.run(QUESTIONS)
            for r in results:  # every request answered
                assert r.ok and r.error is None, r.error
                for layer in r.layers:
                    assert all(resp.error is None and resp.text for resp in layer.responses), layer
            outputs.append([r.output for r in results])
    return box, plan, outputs


def check_box(box: Box, plan: Any) -> None:
    starts = box.events("start")
    assert {e["engine"] for e in starts} == {m.id for m in plan.models}
    for e in starts:  # every engine on its planned GPUs
        assert e["gpus"] == plan.engine(e["engine"]).gpus, e
    assert not box.events("oom")
    for e in box.events("alloc"):  # no GPU over its memory at any moment
        assert e["used"] <= box.cards[e["gpu"]].total, e
    for card, peak in zip(box.cards, box.peaks(), strict=True):
        assert peak <= card.total, (card.index, peak / GIB)


def test_moa_lite_on_8xh200_sleeps_at_both_levels_and_reloads_discarded_weights(
        home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    box, plan, passes = run_on_box(home, monkeypatch, "moa-lite", "8xH200-141GB", cpu_memory="400GiB")
    assert {e.swap for e in plan.models} == {"sleep1", "sleep2"} and len(plan.phases) == 2
    check_box(box, plan)
    assert passes[0] == passes[1]  # the same greedy answers after sleeping and waking
    levels = {e["level"] for e in box.events("sleep")}
    assert levels == {1, 2} and box.events("reload_weights")
    assert all(not e["garbage"] for e in box.events("wake") if e["tags"] != ["weights"])
    assert len(starts := box.events("start")) == len(plan.models), starts  # loaded once each


def test_moa_lite_on_4xh100_awq_reloads_and_sleeps_engines_sharing_gpus(
        home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    box, plan, _ = run_on_box(home, monkeypatch, "moa-lite", "4xH100-80GB", quantization="awq", passes=1)
    assert {e.swap for e in plan.models} == {"sleep1", "reload"}
    check_box(box, plan)  # a reloaded engine starts only once its predecessor's memory is free
    reloaded = [m.id for m in plan.models if m.swap == "reload"]
    assert any(sum(e["engine"] == m for e in box.events("start")) > 1 for m in reloaded)
    assert all(e["kwargs"]["dtype"] == "float16" for e in box.events("start"))  # AWQ in its checkpoint's dtype


def test_moa_on_8xh100_awq_is_resident_with_two_engines_per_gpu_and_stops_at_end_of_turn(
        home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    box, plan, passes = run_on_box(home, monkeypatch, "moa", "8xH100-80GB", quantization="awq",
                                   no_generation_config=("llama-3-70b-instruct",))
    assert len(plan.phases) == 1
    shared = [g for g in range(8) if sum(g in e.gpus for e in plan.models) > 1]
    assert shared, "co-located engines pass each other's start-up free-memory check"
    check_box(box, plan)
    assert passes[0] == passes[1]
    # Llama 3's folder has no generation_config.json: its <|eot_id|> comes from the model config's stop_tokens
    assert all("AND MORE TEXT" not in (out or "") for out in passes[0])
