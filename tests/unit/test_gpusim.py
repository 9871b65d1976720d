"""The simulated GPU server (moa_local.gpusim) in this process: vLLM 0.32's CUDA rules one by one, and every plan of
the paper's recipes replayed on it, phase by phase, with the exact arguments and environment a worker would get.

Each rule test pairs what moa-local passes now with what it passed before issue 13, so the fix is what makes it pass.
The end-to-end runs through real worker processes are in tests/integration/test_gpu_box.py.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from moa_local.config import load_model_config, load_recipe
from moa_local.config.recipe import EngineOptions, Recipe
from moa_local.engines.vllm import engine_kwargs, worker_env
from moa_local.errors import PlacementError
from moa_local.gpusim import ENV, Box
from moa_local.gpusim.engine import LLM, SamplingParams
from moa_local.gpusim.weights import make_weights
from moa_local.placement import build_hardware, plan_recipe
from moa_local.placement.phases import planned_options
from moa_local.placement.plan import Plan

GIB = 1024**3


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Simulated weights of every model of the paper's recipes: full precision, AWQ and FP8 checkpoints."""
    root = tmp_path_factory.mktemp("weights")
    for model_id in load_recipe("moa").model_ids():
        config = load_model_config(model_id)
        for quant in (None, "awq", "fp8"):
            make_weights(config, root / (quant or "bf16") / model_id, quantization=quant)
    return root


@pytest.fixture
def box(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Box]:
    created = Box.create(tmp_path / "box", "8xH100-80GB")
    monkeypatch.setenv(ENV, str(created.path))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    yield created


def start(folder: Path, env: dict[str, str] | EngineOptions, monkeypatch: pytest.MonkeyPatch, **kwargs: Any) -> LLM:
    """Start a simulated engine with a worker's environment (given, or the one ``worker_env`` makes from options
    in a parent that sees every GPU)."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    if isinstance(env, EngineOptions):
        env = worker_env(env)
    for key in ("CUDA_VISIBLE_DEVICES", "VLLM_RAY_BUNDLE_INDICES"):
        if key in env:
            monkeypatch.setenv(key, env[key])
    return LLM(model=str(folder), tokenizer=str(folder), **kwargs)


def with_all(recipe: Recipe, **options: object) -> Recipe:
    engines = {m: recipe.engine_options(m).model_copy(update=options) for m in recipe.model_ids()}
    return recipe.model_copy(update={"engines": engines})


# -- vLLM's rules ------------------------------------------------------------------------------------------------


def test_engines_without_cuda_visible_devices_all_land_on_gpu_0(box: Box, weights: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Finding 1: the plan puts the two 70B engines on GPUs 0-3 and 4-7; before the fix no CUDA_VISIBLE_DEVICES was
    set, so vLLM put both on GPUs 0-3 and the second failed its start-up free-memory check."""
    recipe = load_recipe("moa")
    plan = plan_recipe(recipe, build_hardware(gpus="8xH100-80GB", cpu_memory="2TiB", detect=False), backend="vllm")
    options = planned_options(recipe, plan)
    a, b = plan.phase_models(1)
    assert set(plan.engine(a).gpus).isdisjoint(plan.engine(b).gpus)
    for model_id in (a, b):
        opts = options[model_id]
        llm = start(weights / "bf16" / model_id, opts, monkeypatch,
                    **engine_kwargs(load_model_config(model_id), opts, device="cuda"))
        assert llm.gpus == plan.engine(model_id).gpus
    box.free(engine=a), box.free(engine=b)
    start(weights / "bf16" / a, {}, monkeypatch, **engine_kwargs(load_model_config(a), options[a], device="cuda"))
    with pytest.raises(ValueError, match="Free memory on device cuda:0 .* on startup is less than desired"):
        start(weights / "bf16" / b, {}, monkeypatch, **engine_kwargs(load_model_config(b), options[b], device="cuda"))


def test_kv_cache_bytes_without_a_utilization_refuses_a_second_engine_on_the_gpu(
        box: Box, weights: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Finding 8: with kv_cache_memory_bytes and no gpu_memory_utilization, vLLM still checks free memory against
    the default 0.92 (v1/worker/utils.py request_memory), so a second engine on the GPU is refused; the planner now
    always passes each engine's own share."""
    recipe = load_recipe("self-moa")
    model = recipe.model_ids()[0]
    two = recipe.model_copy(update={"engines": {model: EngineOptions(kv_cache_memory_bytes=4 * GIB)}})
    plan = plan_recipe(two, build_hardware(gpus="1xH100-80GB", cpu_memory="2TiB", detect=False), backend="vllm")
    opts = planned_options(two, plan)[model]
    kwargs = engine_kwargs(load_model_config(model), opts, device="cuda")
    assert 0 < kwargs["gpu_memory_utilization"] < 0.5
    folder = weights.parent / "q7"
    make_weights(load_model_config(model), folder)
    box.alloc(0, 40 * GIB, tag="other", engine="someone else")  # another engine holds half the card
    start(folder, opts, monkeypatch, **kwargs)
    box.free(engine=folder.name)
    del kwargs["gpu_memory_utilization"]  # before the fix
    with pytest.raises(ValueError, match=r"desired GPU memory utilization \(0.92"):
        start(folder, opts, monkeypatch, **kwargs)


def test_max_model_len_must_fit_the_kv_cache(box: Box, weights: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Finding 4: vLLM refuses to start when one max_model_len sequence does not fit the KV it found
    (v1/core/kv_cache_utils.py); a plan that set max_model_len to its own KV estimate broke on any shortfall."""
    folder = weights / "bf16" / "mixtral-8x22b-instruct"
    with pytest.raises(ValueError, match=r"To serve at least one request with the model's max seq len \(65536\)"):
        start(folder, {"CUDA_VISIBLE_DEVICES": "0,1,2,3"}, monkeypatch, dtype="bfloat16", tensor_parallel_size=4,
              max_model_len=65536, gpu_memory_utilization=0.88)


def test_quantization_rules(box: Box, weights: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Finding 5 and 6 as vLLM 0.32 has them: AWQ accepts bfloat16 and float16 (auto_awq.py) but needs an AWQ
    checkpoint; FP8 on a full-precision checkpoint is online quantization, loaded layer by layer."""
    env = {"CUDA_VISIBLE_DEVICES": "0,1"}
    qwen = "qwen1.5-72b-chat"
    for dtype in ("bfloat16", "float16"):
        start(weights / "awq" / qwen, env, monkeypatch, dtype=dtype, quantization="awq", tensor_parallel_size=2,
              max_model_len=4096).close()
    with pytest.raises(ValueError, match="float32 is not supported for quantization method awq"):
        start(weights / "awq" / qwen, env, monkeypatch, dtype="float32", quantization="awq", tensor_parallel_size=2)
    with pytest.raises(ValueError, match="Cannot find the config file for awq"):
        start(weights / "bf16" / qwen, env, monkeypatch, quantization="awq", tensor_parallel_size=2)
    with pytest.raises(ValueError, match=r"model config \(awq\) does not match .* \(fp8\)"):
        start(weights / "awq" / qwen, env, monkeypatch, quantization="fp8", tensor_parallel_size=2)
    online = start(weights / "bf16" / qwen, env, monkeypatch, dtype="bfloat16", quantization="fp8",
                   tensor_parallel_size=2, max_model_len=4096)
    assert online.rank.weights_load_peak > 0 and any(e["tag"] == "load" for e in box.events("alloc"))


def test_tensor_parallel_beyond_the_visible_gpus_needs_the_ray_executor(box: Box, weights: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Finding 7: a Ray actor without GPUs has CUDA_VISIBLE_DEVICES=""; without distributed_executor_backend="ray"
    vLLM refuses TP > 1 there (config/parallel.py). engine_kwargs used to drop the option."""
    folder = weights / "bf16" / "llama-3-70b-instruct"
    with pytest.raises(ValueError, match=r"World size \(4\) is larger than the number of available GPUs \(0\)"):
        start(folder, {"CUDA_VISIBLE_DEVICES": ""}, monkeypatch, tensor_parallel_size=4)
    kwargs = engine_kwargs(load_model_config("llama-3-70b-instruct"),
                           EngineOptions(tensor_parallel_size=4, distributed_executor_backend="ray"), device="cuda")
    assert kwargs["distributed_executor_backend"] == "ray"


def test_sleep_level_2_answers_garbage_until_the_weights_are_reloaded(box: Box, weights: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Finding 3: after sleep(level=2) the weights memory comes back empty (device_allocator/cumem.py)."""
    llm = start(weights / "bf16" / "llama-3-70b-instruct", {"CUDA_VISIBLE_DEVICES": "4,5,6,7"}, monkeypatch,
                tensor_parallel_size=4, max_model_len=8192, gpu_memory_utilization=0.85, enable_sleep_mode=True)
    params = SamplingParams(temperature=0, max_tokens=200)
    before = llm.answer([1, 2, 3], params)
    awake = box.used(4)
    llm.sleep(level=1)
    asleep = box.used(4)
    assert asleep < awake and asleep >= llm.rank.context + llm.rank.graphs  # context, NCCL, graphs stay
    llm.wake_up()
    assert llm.answer([1, 2, 3], params) == before and box.used(4) == awake
    llm.sleep(level=2)
    llm.wake_up()
    assert llm.answer([1, 2, 3], params) != before  # discarded weights
    llm.sleep(level=2)
    llm.wake_up(tags=["weights"])
    llm.collective_rpc("reload_weights")
    llm.wake_up(tags=["kv_cache"])
    assert llm.answer([1, 2, 3], params) == before and box.used(4) == awake


# -- every plan of the paper's recipes, replayed ------------------------------------------------------------------

CARDS = ["8xH100-80GB", "8xA100-80GB", "4xH100-80GB", "1xH200-141GB", "8xH200-141GB"]


def replay(recipe: Recipe, plan: Plan, weights: Path, box: Box, monkeypatch: pytest.MonkeyPatch) -> int:
    """Walk the plan's schedule as the phased runner does (take the resident phase out by sleeping or closing,
    bring the next in by waking or starting), each engine with a worker's exact arguments and environment.
    Returns the number of engine starts."""
    options = planned_options(recipe, plan)
    quant = {m: options[m].quantization for m in recipe.model_ids()}
    awake: dict[str, LLM] = {}
    asleep: dict[str, tuple[LLM, int]] = {}
    resident: int | None = None
    starts = 0
    for step in [*plan.schedule, *plan.schedule]:  # twice: every swap happens at least once in both directions
        if step.phase == resident:
            continue
        for model_id in plan.phase_models(resident) if resident is not None else []:
            llm, swap = awake.pop(model_id), plan.engine(model_id).swap
            if swap in ("sleep1", "sleep2"):
                llm.sleep(level=int(swap[-1]))
                asleep[model_id] = (llm, int(swap[-1]))
            else:
                llm.close()
        for model_id in plan.phase_models(step.phase):
            if model_id in asleep:
                llm, level = asleep.pop(model_id)
                if level == 2:
                    llm.wake_up(tags=["weights"]), llm.collective_rpc("reload_weights"), llm.wake_up(tags=["kv_cache"])
                else:
                    llm.wake_up()
                assert not llm.garbage
            else:
                opts = options[model_id]
                folder = weights / ("awq" if quant[model_id] == "awq" else "bf16") / model_id
                llm = start(folder, opts, monkeypatch,
                            **engine_kwargs(load_model_config(model_id), opts, device="cuda"))
                assert llm.gpus == plan.engine(model_id).gpus  # it started on its planned GPUs
                starts += 1
            awake[model_id] = llm
        resident = step.phase
    for llm in [*awake.values(), *(x for x, _ in asleep.values())]:
        llm.close()
    return starts


@pytest.mark.parametrize("recipe_name", ["moa", "moa-lite"])
@pytest.mark.parametrize("cards", CARDS)
@pytest.mark.parametrize("quantization", [None, "fp8", "awq"])
def test_every_plan_starts_and_swaps_on_the_simulated_box(recipe_name: str, cards: str, quantization: str | None,
                                                          weights: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = load_recipe(recipe_name)
    if quantization:
        recipe = with_all(recipe, quantization=quantization)
    try:
        plan = plan_recipe(recipe, build_hardware(gpus=cards, cpu_memory="1TiB", cpu_cores=16, detect=False),
                           backend="vllm")
    except PlacementError as err:
        assert "Use " in str(err)
        pytest.skip(f"refused by the planner: {str(err)[:80]}")
    box = Box.create(tmp_path / "box", cards)
    monkeypatch.setenv(ENV, str(box.path))
    starts = replay(recipe, plan, weights, box, monkeypatch)
    assert starts >= len(recipe.model_ids())
    assert not box.events("oom")
    for card, peak in zip(box.cards, box.peaks(), strict=True):
        assert peak <= card.total, (card, peak / GIB)


@pytest.mark.parametrize("recipe_name", ["moa", "moa-lite"])
def test_two_rtx4090_are_refused_with_a_fix(recipe_name: str) -> None:
    for quantization in (None, "fp8", "awq"):
        recipe = load_recipe(recipe_name)
        if quantization:
            recipe = with_all(recipe, quantization=quantization)
        with pytest.raises(PlacementError, match=r"needs .* GiB .* Use (\d+ GPUs like these|larger GPUs)"):
            plan_recipe(recipe, build_hardware(gpus="2xRTX4090-24GB", cpu_memory="128GiB", detect=False))


def test_the_simulator_never_reads_the_planner() -> None:
    """Its accounting is written from vLLM's code, not from moa_local.placement (else it would only check the
    planner against itself)."""
    root = Path(__file__).parents[2] / "moa_local" / "gpusim"
    for path in root.rglob("*.py"):
        text = path.read_text()
        assert "moa_local.placement" not in text.replace("never imports moa_local.placement", "").replace(
            "Never imports moa_local.placement", "").replace("Nothing here imports moa_local.placement", ""), path
    assert os.environ.get(ENV) is None or True
