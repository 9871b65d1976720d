"""The placement planner: shipped recipes on known hardware, error messages, and properties over random
hardware and recipes (nothing over capacity, every model placed once, valid TP, only PlacementError)."""

from __future__ import annotations

import io
import json
from collections import defaultdict

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from rich.console import Console

from moa_local.config import (
    EngineOptions,
    Recipe,
    Role,
    Sampling,
    list_model_ids,
    load_model_config,
    load_recipe,
)
from moa_local.errors import PlacementError
from moa_local.placement import (
    Hardware,
    Plan,
    build_hardware,
    parse_nodes,
    plan_recipe,
    render_plan,
    time_estimate,
)
from moa_local.placement.hardware import CARD_CATALOG_MIB, GIB, NodeSpec, card_spec
from moa_local.placement.memory import valid_tensor_parallel_sizes
from moa_local.placement.packing import MAX_GPU_UTILIZATION
from moa_local.placement.planner import required_context


def hw(gpus: str, *, cpu: str = "2TiB", cores: int = 16) -> Hardware:
    return build_hardware(gpus=gpus, cpu_memory=cpu, cpu_cores=cores, detect=False)


def recipe_of(
    proposers: list[str], aggregator: str, *, layers: int = 2, engines: dict[str, EngineOptions] | None = None
) -> Recipe:
    return Recipe(
        name="t",
        layers=layers,
        proposers=[Role(model=m, sampling=Sampling(max_tokens=512)) for m in proposers],
        aggregator=Role(model=aggregator, sampling=Sampling(max_tokens=512)),
        engines=engines or {},
    )


def with_all(recipe: Recipe, **options: object) -> Recipe:
    engines = {m: recipe.engine_options(m).model_copy(update=options) for m in recipe.model_ids()}
    return recipe.model_copy(update={"engines": engines})


def check_invariants(plan: Plan, recipe: Recipe, hardware: Hardware) -> None:
    """What every plan must satisfy."""
    ids = recipe.model_ids()
    # 1. every model is placed once, in exactly one phase
    assert sorted(e.id for e in plan.models) == sorted(ids)
    phase_lists = [m for p in plan.phases for m in p.models]
    assert sorted(phase_lists) == sorted(ids)
    for e in plan.models:
        assert e.id in plan.phases[e.phase].models
    # 2. the schedule: every layer runs every proposer role once, then the aggregator, each in its engine's phase
    roles_by_layer: dict[int, list[str]] = defaultdict(list)
    for step in plan.schedule:
        for role in step.roles:
            roles_by_layer[step.layer].append(role)
            model = next(e.id for e in plan.models if role in e.roles)
            assert model in plan.phases[step.phase].models
    proposer_names = sorted(str(r.name) for r in recipe.proposer_roles())
    for layer in range(1, recipe.layers + 1):
        assert sorted(roles_by_layer[layer]) == proposer_names
    assert plan.schedule[-1].kind == "aggregate" and plan.schedule[-1].roles == [
        recipe.aggregator_role().name
    ]
    if plan.device != "cuda":
        return
    # 3. GPUs: valid TP, no GPU over capacity in any phase (counting what sleeping engines keep)
    slots = hardware.slots()
    for e in plan.models:
        arch = load_model_config(e.id).architecture
        assert e.tensor_parallel_size in valid_tensor_parallel_sizes(arch, limit=len(slots))
        assert len(e.gpus) == len(set(e.gpus)) == e.tensor_parallel_size
        assert all(0 <= g < len(slots) for g in e.gpus)
        assert e.kv_tokens >= e.min_context
        assert e.max_model_len <= max(arch.max_context, recipe.engine_options(e.id).max_model_len or 0)
        options = recipe.engine_options(e.id)
        if options.gpu_memory_utilization is None and options.kv_cache_memory_bytes is None:
            # vLLM refuses to start when max_model_len's KV does not fit: the plan keeps 1.2x of the context
            assert e.max_model_len >= e.min_context and e.kv_tokens >= 1.2 * e.min_context, e.id
        assert e.memory_utilization is not None  # always passed: vLLM checks free memory against it at start
    ceiling = max([MAX_GPU_UTILIZATION] + [recipe.engine_options(m).gpu_memory_utilization or 0 for m in ids])
    for phase in plan.phases:
        for slot in slots:
            cap = slot.spec.cuda_bytes  # vLLM's utilization is a share of CUDA's total, after context and NCCL
            used = sum(
                (e.memory_utilization or 0) * cap + e.context_bytes_per_gpu
                for e in plan.models
                if e.phase == phase.index and slot.index in e.gpus
            )
            asleep = sum(
                e.asleep_gib_per_gpu * GIB
                for e in plan.models
                if e.phase != phase.index and slot.index in e.gpus
            )
            assert used + asleep <= min(cap, ceiling * cap) + 0.02 * GIB, (phase.index, slot.index)


# -- shipped recipes ---------------------------------------------------------------------------------------------


def test_moa_on_8xh100_is_three_phases_with_sleep() -> None:
    recipe, hardware = load_recipe("moa"), hw("8xH100-80GB")
    plan = plan_recipe(recipe, hardware)
    check_invariants(plan, recipe, hardware)
    assert len(plan.phases) == 3 and {e.swap for e in plan.models} <= {"sleep1", "reload"}
    # the aggregator (a proposer too) is resident when the last layer ends: no switch before aggregation
    assert plan.schedule[-1].phase == plan.schedule[-2].phase == plan.engine("qwen1.5-110b-chat").phase
    # snake order: the last phase of a layer is the first of the next
    layer_ends = [s for a, s in zip(plan.schedule, plan.schedule[1:], strict=False) if a.layer != s.layer]
    for step in layer_ends:
        before = plan.schedule[plan.schedule.index(step) - 1]
        assert before.phase == step.phase
    assert plan.switches == 2 * recipe.layers
    assert plan.initial_load_s > 60 and plan.switch_s > 0


def test_moa_lite_aggregator_phase_ends_an_even_number_of_layers() -> None:
    recipe, hardware = load_recipe("moa-lite"), hw("8xH100-80GB")
    plan = plan_recipe(recipe, hardware)
    check_invariants(plan, recipe, hardware)
    assert plan.engine("qwen1.5-72b-chat").phase == plan.schedule[-1].phase == plan.schedule[-2].phase == 0


def test_quantization_trades_phases() -> None:
    recipe, hardware = load_recipe("moa"), hw("8xH100-80GB")
    phases = {
        q: len(plan_recipe(with_all(recipe, quantization=q), hardware).phases) for q in (None, "fp8", "awq")
    }
    assert phases[None] > phases["fp8"] > phases["awq"] == 1
    resident = plan_recipe(with_all(recipe, quantization="awq"), hardware)
    assert resident.swap == "resident" and resident.switch_s == 0 and resident.switches == 0


def test_moa_does_not_fit_two_rtx4090_even_quantized() -> None:
    recipe, hardware = load_recipe("moa"), hw("2xRTX4090-24GB", cpu="128GiB")
    for quant in (None, "fp8", "awq"):
        with pytest.raises(PlacementError, match=r"needs [\d.]+ GiB at .*; the largest GPU set .* Use "):
            plan_recipe(with_all(recipe, quantization=quant), hardware)


def test_error_names_the_fix() -> None:
    recipe = recipe_of(["llama-3-70b-instruct"], "llama-3-70b-instruct", layers=1)
    with pytest.raises(PlacementError) as err:
        plan_recipe(recipe, hw("1xH100-80GB"))
    message = str(err.value)
    assert message.startswith("'llama-3-70b-instruct' needs 13")
    assert "at bf16" in message and "79.2 GiB" in message  # CUDA's total of an H100, what vLLM budgets against
    assert "quantization: awq" in message and "tensor_parallel_size=2" in message
    # fixed TP=1 on a machine with 8 GPUs: the fix is a larger TP
    fixed = recipe_of(["llama-3-70b-instruct"], "llama-3-70b-instruct", layers=1,
                      engines={"llama-3-70b-instruct": EngineOptions(tensor_parallel_size=1)})  # fmt: skip
    with pytest.raises(PlacementError, match="Use tensor_parallel_size=2"):
        plan_recipe(fixed, hw("8xH100-80GB"))


def test_tiny_on_cpu_splits_cores_between_co_resident_engines() -> None:
    recipe, hardware = load_recipe("tiny"), hw("none", cpu="16GiB", cores=2)
    plan = plan_recipe(recipe, hardware)
    check_invariants(plan, recipe, hardware)
    assert plan.device == "cpu" and len(plan.phases) == 1 and plan.swap == "resident"
    assert sorted(e.cpu_threads or "" for e in plan.models) == ["0", "1"]
    assert all(e.cpu_kvcache_gib == 1.0 and e.dtype == "float32" for e in plan.models)
    assert plan.engine("smollm2-135m-instruct").max_model_len == 2048


def test_tiny_on_a_small_cpu_budget_runs_one_model_per_phase() -> None:
    recipe, hardware = load_recipe("tiny"), hw("none", cpu="8GiB", cores=2)  # ~6.9 GiB for Gemma alone, 10.8 for both
    plan = plan_recipe(recipe, hardware)
    check_invariants(plan, recipe, hardware)
    assert [len(p.models) for p in plan.phases] == [1, 1] and plan.swap == "reload"
    assert all(e.cpu_threads == "0-1" for e in plan.models)  # alone in its phase: all cores
    # the aggregator (smollm2) ends layer 2, so the run needs exactly two switches
    assert plan.phase_models(plan.schedule[-1].phase) == ["smollm2-135m-instruct"]
    assert plan.switches == 2


def test_tiny_cpu_budget_too_small_says_how_to_fix() -> None:
    with pytest.raises(PlacementError, match=r"CPU memory .* Use .*cpu_kvcache_gib: 0.5.*--cpu-memory"):
        plan_recipe(load_recipe("tiny"), hw("none", cpu="2GiB", cores=2))


def test_fake_backend_needs_no_memory() -> None:
    recipe = load_recipe("fake")
    plan = plan_recipe(recipe, hw("none", cpu="1GiB", cores=1))
    assert plan.device == "none" and plan.swap == "none" and len(plan.phases) == 1
    assert all(e.weights_gib == 0 and e.kv_gib == 0 for e in plan.models)
    big = recipe_of(["qwen1.5-110b-chat"], "dbrx-instruct")
    assert plan_recipe(big, hw("none", cpu="1GiB"), backend="fake").phases[0].models == big.model_ids()


def test_small_models_share_one_gpu() -> None:
    recipe = recipe_of(
        ["smollm2-135m-instruct", "gemma3-270m", "qwen2.5-7b-instruct"], "smollm2-135m-instruct"
    )
    hardware = hw("1xL40S-48GB")
    plan = plan_recipe(recipe, hardware)
    check_invariants(plan, recipe, hardware)
    assert len(plan.phases) == 1 and all(e.gpus == [0] for e in plan.models)
    total = sum(e.memory_utilization or 0 for e in plan.models)
    assert 0.8 < total <= MAX_GPU_UTILIZATION  # their budgets; each context (0.75 GiB) comes before its budget


def test_explicit_engine_options_are_respected() -> None:
    engines = {
        "llama-3.1-8b-instruct": EngineOptions(tensor_parallel_size=2),
        "qwen2.5-7b-instruct": EngineOptions(gpu_memory_utilization=0.3, max_model_len=4096),
    }
    recipe = recipe_of(
        ["llama-3.1-8b-instruct", "qwen2.5-7b-instruct"], "qwen2.5-7b-instruct", engines=engines
    )
    hardware = hw("4xA100-80GB")
    plan = plan_recipe(recipe, hardware)
    check_invariants(plan, recipe, hardware)
    assert plan.engine("llama-3.1-8b-instruct").tensor_parallel_size == 2
    qwen = plan.engine("qwen2.5-7b-instruct")
    assert qwen.memory_utilization == 0.3 and qwen.max_model_len == 4096


@pytest.mark.parametrize(("model", "tp"), [("smollm2-135m-instruct", 2), ("llama-3-70b-instruct", 3)])
def test_invalid_tensor_parallel_size_is_a_placement_error(model: str, tp: int) -> None:
    recipe = recipe_of([model], model, engines={model: EngineOptions(tensor_parallel_size=tp)})
    with pytest.raises(PlacementError, match=f"tensor_parallel_size={tp}"):
        plan_recipe(recipe, hw("8xH100-80GB"))


def test_engines_stay_on_one_node_unless_they_must_span() -> None:
    nodes = Hardware(nodes=parse_nodes("2x8xH100-80GB"), cpu_memory_bytes=2048 * GIB, cpu_cores=64)
    recipe = load_recipe("moa")
    plan = plan_recipe(recipe, nodes)
    check_invariants(plan, recipe, nodes)
    assert all(len(e.nodes) == 1 for e in plan.models)
    # a 4-bit Mixtral-8x7B does not fit one 24 GiB card: with one card per node it must span two nodes
    small = Hardware(nodes=parse_nodes("2x1xRTX4090-24GB"), cpu_memory_bytes=64 * GIB, cpu_cores=8)
    mixtral = recipe_of(["mixtral-8x7b-instruct"], "mixtral-8x7b-instruct", layers=1,
                        engines={"mixtral-8x7b-instruct": EngineOptions(quantization="awq")})  # fmt: skip
    spanning = plan_recipe(mixtral, small).engine("mixtral-8x7b-instruct")
    assert spanning.nodes == [0, 1] and spanning.tensor_parallel_size == 2


def test_swap_method_follows_cpu_ram_and_backend() -> None:
    recipe = load_recipe("moa")
    assert "sleep2" in {e.swap for e in plan_recipe(recipe, hw("8xH100-80GB", cpu="64GiB")).models}
    assert plan_recipe(recipe, hw("8xH200-141GB", cpu="64GiB")).swap == "sleep2"
    assert plan_recipe(recipe, hw("8xH100-80GB"), backend="transformers").swap == "reload"
    tight = plan_recipe(recipe, hw("4xH100-80GB", cpu="1TiB"))
    check_invariants(tight, recipe, hw("4xH100-80GB", cpu="1TiB"))
    assert "reload" in {e.swap for e in tight.models}  # sleeping engines' residue would crowd the next phase


def test_required_context_counts_references() -> None:
    recipe = load_recipe("moa")  # six proposers x 2048 tokens
    assert required_context(recipe, "qwen1.5-110b-chat", max_context=32768) == 1024 + 6 * 2048 + 2048
    assert required_context(recipe, "llama-3-70b-instruct", max_context=8192) == 8192
    one_layer = recipe_of(["qwen2.5-7b-instruct", "llama-3.1-8b-instruct"], "qwen2.5-7b-instruct", layers=1)
    assert required_context(one_layer, "llama-3.1-8b-instruct", max_context=131072) == 1024 + 512


def test_plan_json_and_rendering() -> None:
    recipe = load_recipe("moa")
    plan = plan_recipe(recipe, hw("8xH100-80GB"))
    data = json.loads(plan.to_json())
    assert {"models", "phases", "schedule", "swap", "switch_s", "initial_load_s"} <= set(data)
    first = data["models"][0]
    for key in ("id", "params_b", "weights_gib", "kv_gib", "gpus", "tensor_parallel_size", "phase",
                "memory_utilization", "cpu_threads", "swap", "kv_tokens", "max_model_len"):  # fmt: skip
        assert key in first
    assert all({"index", "models", "load_s", "swap"} <= set(p) for p in data["phases"])
    console = Console(record=True, width=160)
    console.print(render_plan(plan))
    text = console.export_text()
    for word in ("qwen1.5-110b-chat", "weights GiB", "KV GiB", "TP", "phase", "Cold start"):
        assert word in text
    assert "phase switches per batch" in time_estimate(plan)


def test_unknown_backend_is_a_placement_error() -> None:
    with pytest.raises(PlacementError, match="unknown backend"):
        plan_recipe(load_recipe("tiny"), hw("none", cpu="8GiB"), backend="tpu")


# -- properties --------------------------------------------------------------------------------------------------

MODEL_IDS = sorted(list_model_ids())
SMALL_IDS = [m for m in MODEL_IDS if load_model_config(m).architecture.params_b < 10]
CARDS = sorted(CARD_CATALOG_MIB)


@st.composite
def gpu_hardwares(draw: st.DrawFn) -> Hardware:
    card = card_spec(draw(st.sampled_from(CARDS + ["H100-80GB", "H200-141GB", "A100-80GB"] * 3)))
    per_node = draw(st.sampled_from([1, 2, 3, 4, 8, 8, 8]))
    return Hardware(
        nodes=[NodeSpec(gpus=[card] * per_node) for _ in range(draw(st.integers(1, 2)))],
        cpu_memory_bytes=draw(st.sampled_from([16, 128, 512, 2048])) * GIB,
        cpu_cores=draw(st.integers(1, 64)),
    )


@st.composite
def cpu_hardwares(draw: st.DrawFn) -> Hardware:
    return Hardware(
        cpu_memory_bytes=int(draw(st.sampled_from([1, 2, 3, 4, 6, 8, 16, 32, 64])) * GIB),
        cpu_cores=draw(st.integers(1, 16)),
        cpu_core_ids=draw(st.one_of(st.none(), st.just([4, 5, 6, 7]))),
    )


@st.composite
def engine_options(draw: st.DrawFn) -> EngineOptions:
    update: dict[str, object] = {}
    if draw(st.booleans()):
        update["quantization"] = draw(st.sampled_from(["fp8", "awq", "gptq", "int8"]))
    if draw(st.integers(0, 5)) == 0:
        update["tensor_parallel_size"] = draw(st.sampled_from([1, 2, 4, 8]))
    if draw(st.integers(0, 7)) == 0:
        update["gpu_memory_utilization"] = draw(st.sampled_from([0.2, 0.45, 0.9, 0.95]))
    if draw(st.booleans()):
        update["max_model_len"] = draw(st.sampled_from([512, 2048, 8192]))
    if draw(st.booleans()):
        update["enforce_eager"] = True
    if draw(st.booleans()):
        update["kv_cache_dtype"] = "fp8"
    if draw(st.booleans()):
        update["cpu_kvcache_gib"] = draw(st.sampled_from([0.25, 1.0, 4.0]))
    if draw(st.integers(0, 5)) == 0:
        update["cpu_threads"] = "0"
    return EngineOptions(**update)


@st.composite
def recipes(draw: st.DrawFn, ids: list[str]) -> Recipe:
    proposers = draw(
        st.lists(st.sampled_from(ids), min_size=1, max_size=draw(st.sampled_from([2, 4, 6])), unique=True)
    )
    aggregator = draw(st.sampled_from(ids))
    models = list(dict.fromkeys([*proposers, aggregator]))
    engines = {m: draw(engine_options()) for m in models if draw(st.integers(0, 2)) == 0}
    max_tokens = draw(st.sampled_from([64, 512, 2048]))
    return Recipe(
        name="random",
        layers=draw(st.integers(1, 4)),
        proposers=[Role(model=m, sampling=Sampling(max_tokens=max_tokens)) for m in proposers],
        aggregator=Role(model=aggregator, name="aggregator", sampling=Sampling(max_tokens=max_tokens)),
        engines=engines,
    )


def plan_or_placement_error(recipe: Recipe, hardware: Hardware, backend: str) -> None:
    """The property: a plan that satisfies every invariant, or a PlacementError with a message; nothing else."""
    try:
        plan = plan_recipe(recipe, hardware, backend=backend)
    except PlacementError as exc:
        event("infeasible")
        assert str(exc).startswith("'") and "Use " in str(exc)
        return
    event(
        f"{plan.device}, {min(len(plan.phases), 3)}{'+' * (len(plan.phases) >= 3)} phases, swap {plan.swap}"
    )
    check_invariants(plan, recipe, hardware)
    json.loads(plan.to_json())
    Console(file=io.StringIO(), width=120).print(render_plan(plan))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    recipe=recipes(MODEL_IDS),
    hardware=gpu_hardwares(),
    backend=st.sampled_from(["auto", "vllm", "transformers"]),
)
def test_gpu_plans_fit_or_raise_placement_error(recipe: Recipe, hardware: Hardware, backend: str) -> None:
    plan_or_placement_error(recipe, hardware, backend)


@settings(max_examples=150, deadline=None)
@given(recipe=recipes(SMALL_IDS), hardware=cpu_hardwares())
def test_cpu_plans_fit_or_raise_placement_error(recipe: Recipe, hardware: Hardware) -> None:
    plan_or_placement_error(recipe, hardware, "auto")


@settings(max_examples=30, deadline=None)
@given(recipe=recipes(MODEL_IDS), hardware=st.one_of(gpu_hardwares(), cpu_hardwares()))
def test_fake_backend_always_plans(recipe: Recipe, hardware: Hardware) -> None:
    plan = plan_recipe(recipe, hardware, backend="fake")
    check_invariants(plan, recipe, hardware)
    assert plan.device == "none" and len(plan.phases) == 1


def test_a_plan_exists_for_each_model_alone_on_a_big_node() -> None:
    hardware = hw("8xH200-141GB")
    for model in MODEL_IDS:
        recipe = recipe_of([model], model, layers=1)
        plan = plan_recipe(recipe, hardware)
        check_invariants(plan, recipe, hardware)
        assert len(plan.phases) == 1
