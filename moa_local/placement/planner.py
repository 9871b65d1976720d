"""Placement planner: recipe + hardware -> Plan. Pure: never imports torch or vllm, never loads weights.

Owns the recipe's side of placement: the context each engine must hold, the phase order (a snake across layers so
the last phase of layer k is the first of layer k+1, with the aggregator's phase ending the last layer), the
schedule the phased executor walks, the core split on CPU-only hardware, the fake backend's empty plan, and
assembling the Plan. GPU packing is packing.py, swaps and timing swaps.py, bytes memory.py, hardware hardware.py.

Infeasible recipes raise PlacementError with the numbers and a fix, before anything loads.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from moa_local.config.model import ModelConfig
from moa_local.config.recipe import Recipe
from moa_local.config.registry import load_model_config
from moa_local.engines.cpu import parse_cores, split_cores
from moa_local.errors import PlacementError
from moa_local.placement.hardware import Hardware
from moa_local.placement.memory import (
    DEFAULT_MAX_NUM_BATCHED_TOKENS,
    DEFAULT_MAX_NUM_SEQS,
    GIB,
    CpuEstimate,
    estimate_cpu,
)
from moa_local.placement.packing import MAX_GPU_UTILIZATION, gpu_candidates, label, pack_gpu
from moa_local.placement.plan import EnginePlacement, Phase, Plan, Step, Swap
from moa_local.placement.swaps import (
    CPU_ENGINE_START_S,
    SHUTDOWN_S,
    choose_gpu_swaps,
    cold_load_s,
    gpu_shares,
    overall,
    residuals,
    start_s,
    switch_costs,
    switch_s,
)

PROMPT_TOKENS = 1024
"""Context budget for the conversation and system prompt, on top of references and the answer."""

CPU_RESERVE_BYTES = int(0.5 * GIB)
"""CPU-only: memory kept for the orchestrator process (the CLI, the pipeline) out of --cpu-memory."""

CPU_KV_USABLE_FRACTION = 0.9
"""vLLM-CPU: share of the estimated KV tokens a plan relies on. vLLM rounds the cache to whole blocks and pads hybrid
(sliding-window + full attention) KV groups: Gemma-3-270M's 1 GiB holds 27,678 tokens, 5 % fewer than its per-token
size says. A planned max_model_len above what the cache holds would make vLLM refuse to start."""


def required_context(recipe: Recipe, model_id: str, *, max_context: int) -> int:
    """Tokens one sequence of this engine needs: prompt budget + references (layers after the first, and the
    aggregator, see every proposer's answer) + its own answer; at most the model's context."""
    options = recipe.engine_options(model_id)
    if options.max_model_len is not None:
        return options.max_model_len
    proposers = recipe.proposer_roles()
    references = sum(r.sampling.max_tokens for r in proposers)
    needs = [
        PROMPT_TOKENS + (references if recipe.layers > 1 else 0) + r.sampling.max_tokens
        for r in proposers
        if r.model == model_id
    ]
    aggregator = recipe.aggregator_role()
    if aggregator.model == model_id:
        needs.append(PROMPT_TOKENS + references + aggregator.sampling.max_tokens)
    return min(max_context, max(needs))


def capped_context_notes(recipe: Recipe, configs: Mapping[str, ModelConfig]) -> list[str]:
    """One note per model whose context window is shorter than what the recipe asks of it (it is capped there)."""
    notes = []
    for model_id, model in configs.items():
        want = required_context(recipe, model_id, max_context=10**9)
        have = model.architecture.max_context
        if recipe.engine_options(model_id).max_model_len is None and want > have:
            notes.append(
                f"'{model_id}' holds {have} tokens, less than the {want} the recipe asks of it ({PROMPT_TOKENS} of "
                f"prompt + the references + its answer): at run time its layer-2+ and aggregation requests that "
                f"exceed {have} tokens minus its max_tokens go again with their references trimmed, the longest "
                "cut first (recorded as 'trimmed' in the trace); one too long even without them fails. Lower the "
                "proposers' max_tokens, or give it no role after layer 1, to keep the references whole."
            )
    return notes


def _roles_by_model(recipe: Recipe) -> dict[str, list[str]]:
    roles: dict[str, list[str]] = {m: [] for m in recipe.model_ids()}
    for role in recipe.proposer_roles():
        roles[role.model].append(str(role.name))
    aggregator = recipe.aggregator_role()
    roles[aggregator.model].append(str(aggregator.name))
    return roles


def _load_models(recipe: Recipe, models: Mapping[str, ModelConfig] | None) -> dict[str, ModelConfig]:
    out = {}
    for model_id in recipe.model_ids():
        out[model_id] = (
            models[model_id] if models is not None and model_id in models else load_model_config(model_id)
        )
    return out


def _order_phases(
    groups: list[list[str]], *, proposer_models: set[str], aggregator: str, layers: int
) -> list[int]:
    """Execution order of the groups in layer 1. The aggregator's group ends the last layer: last in the list when
    the number of layers is odd (the snake ends forward), first when even; an aggregator-only group goes last."""
    proposing = [i for i, g in enumerate(groups) if proposer_models & set(g)]
    only_aggregate = [i for i, g in enumerate(groups) if not proposer_models & set(g)]
    home = next(i for i, g in enumerate(groups) if aggregator in g)
    if home in proposing:
        proposing.remove(home)
        proposing = [*proposing, home] if layers % 2 == 1 else [home, *proposing]
    return proposing + only_aggregate


def _schedule(phases: list[list[str]], *, recipe: Recipe, proposer_models: set[str]) -> list[Step]:
    proposing = [i for i, models in enumerate(phases) if proposer_models & set(models)]
    aggregator = recipe.aggregator_role()
    steps: list[Step] = []
    for layer in range(1, recipe.layers + 1):
        for p in proposing if layer % 2 == 1 else reversed(proposing):
            names = [r.name for r in recipe.proposer_roles() if r.model in phases[p]]
            steps.append(Step(kind="propose", layer=layer, phase=p, roles=[str(n) for n in names]))
    home = next(i for i, models in enumerate(phases) if aggregator.model in models)
    steps.append(Step(kind="aggregate", layer=recipe.layers + 1, phase=home, roles=[str(aggregator.name)]))
    return steps


# -- the three planners --------------------------------------------------------------------------------------------


def _plan_gpu(recipe: Recipe, hardware: Hardware, configs: dict[str, ModelConfig], *, backend: str) -> Plan:
    gpu_slots = hardware.slots()
    explicit = [
        recipe.engine_options(m).gpu_memory_utilization or 0.0 for m in configs
    ]  # a recipe asking for more than 0.90 raises the planner's ceiling
    fraction = min(0.98, max(MAX_GPU_UTILIZATION, *explicit))
    roles = _roles_by_model(recipe)
    contexts = {
        m: required_context(recipe, m, max_context=c.architecture.max_context) for m, c in configs.items()
    }
    engines = gpu_candidates(recipe, configs, roles=roles, contexts=contexts, n_gpus=len(gpu_slots))
    proposer_models = {e.id for e in engines if e.proposes}
    aggregator = recipe.aggregator_role().model

    # 1. pack engines into phases (each fits alone, else PlacementError)
    packed = pack_gpu(engines, gpu_slots, fraction)
    groups = [[s.engine.id for s in state.slots] for state in packed]
    order = _order_phases(
        groups, proposer_models=proposer_models, aggregator=aggregator, layers=recipe.layers
    )
    states = [packed[i] for i in order]
    for state in states:
        state.slots.sort(key=lambda s: recipe.model_ids().index(s.engine.id))
    phase_models = [[s.engine.id for s in state.slots] for state in states]

    # 2. swap method, then each engine's share of its GPUs
    swaps = choose_gpu_swaps(states, gpu_slots, hardware, backend=backend, fraction=fraction)
    shares = gpu_shares(states, gpu_slots, fraction=fraction, swaps=swaps)

    # 3. per-engine placement records
    placements: dict[str, EnginePlacement] = {}
    for p, state in enumerate(states):
        for x in state.slots:
            est, engine = x.engine.estimates[x.tp], x.engine
            mine = shares[engine.id]
            cuda = min(gpu_slots[g].spec.cuda_bytes for g in x.gpus)
            if engine.options.gpu_memory_utilization is not None:
                utilization = engine.options.gpu_memory_utilization
            elif engine.options.kv_cache_memory_bytes is not None:
                # vLLM checks the free memory against gpu_memory_utilization even when the KV size is given
                # (v1/worker/utils.py request_memory): pass exactly this engine's budget, not the 0.92 default
                used = est.budget_fixed_per_gpu + engine.options.kv_cache_memory_bytes
                utilization = math.ceil(used / cuda * 1e4) / 1e4
            else:
                utilization = min(est.utilization(mine[g], gpu_slots[g].spec.cuda_bytes) for g in x.gpus)
            if engine.options.kv_cache_memory_bytes is not None:
                kv_tokens = engine.options.kv_cache_memory_bytes // est.kv_per_token_per_gpu
            else:
                kv_tokens = min(
                    est.kv_tokens(int(utilization * gpu_slots[g].spec.cuda_bytes)) for g in x.gpus
                )
            placements[engine.id] = EnginePlacement(
                id=engine.id,
                roles=engine.roles,
                phase=p,
                device="cuda",
                params_b=engine.model.architecture.params_b,
                dtype=est.dtype,
                quantization=est.quantization,
                weights_gib=round(est.weights_bytes / GIB, 2),
                kv_gib=round(kv_tokens * est.kv_per_token_per_gpu * x.tp / GIB, 2),
                kv_tokens=kv_tokens,
                max_model_len=engine.options.max_model_len or engine.context,
                min_context=engine.context,
                gpus=list(x.gpus),
                nodes=sorted({gpu_slots[g].node for g in x.gpus}),
                tensor_parallel_size=x.tp,
                memory_utilization=utilization,
                memory_gib_per_gpu=round(min(mine.values()) / GIB, 2),
                swap=swaps[engine.id],
                asleep_gib_per_gpu=round(est.sleep_residual_per_gpu / GIB, 2)
                if swaps[engine.id] in ("sleep1", "sleep2")
                else 0.0,
                load_s=round(cold_load_s([est.weights_bytes], [start_s(engine)]), 1),
                max_num_batched_tokens=engine.options.max_num_batched_tokens or DEFAULT_MAX_NUM_BATCHED_TOKENS,
                max_num_seqs=engine.options.max_num_seqs or DEFAULT_MAX_NUM_SEQS,
                context_bytes_per_gpu=est.context_bytes,
            )

    # 4. time estimates
    loads = [
        cold_load_s(
            [x.engine.estimates[x.tp].weights_bytes for x in s.slots], [start_s(x.engine) for x in s.slots]
        )
        for s in states
    ]
    schedule = _schedule(phase_models, recipe=recipe, proposer_models=proposer_models)
    cost = {
        (a, b): switch_s(states[a].slots, states[b].slots, swaps)
        for a in range(len(states))
        for b in range(len(states))
        if a != b
    }
    schedule, worst, total = switch_costs(schedule, cost, len(states))
    notes = []
    asleep = max(
        (residuals(states, p, s.index, swaps) for p in range(len(states)) for s in gpu_slots), default=0
    )
    if asleep:
        notes.append(
            f"Sleeping engines keep up to {asleep / GIB:.1f} GiB per GPU (CUDA context, NCCL, graphs)."
        )
    if backend == "transformers":
        notes.append(
            "transformers backend: memory_utilization is the planned share; it does not preallocate KV."
        )
    notes.extend(capped_context_notes(recipe, configs))
    return Plan(
        recipe=recipe.name,
        backend=backend,
        device="cuda",
        hardware=hardware.describe(),
        swap=overall(list(swaps.values())),
        models=[placements[m] for m in recipe.model_ids()],
        phases=[
            Phase(
                index=p,
                models=phase_models[p],
                swap=overall([swaps[m] for m in phase_models[p]]),
                load_s=round(loads[p], 1),
                switch_in_s=round(worst[p], 1),
            )
            for p in range(len(states))
        ],
        schedule=schedule,
        initial_load_s=round(loads[schedule[0].phase], 1),
        switch_s=round(total, 1),
        notes=notes,
    )


def _core_split(core_ids: list[int], auto: list[str], explicit: list[str]) -> dict[str, str]:
    """Core bindings for the engines of one phase that have none: disjoint shares of the cores the explicit
    bindings leave free (all cores when they claim every one)."""
    claimed: set[int] = set()
    for binding in explicit:
        try:
            claimed |= parse_cores(binding)
        except ValueError:
            continue  # a bad binding is reported by the engine's own option check
    free = [c for c in core_ids if c not in claimed] or core_ids
    return dict(zip(auto, split_cores(len(auto), free), strict=True))


def _plan_cpu(recipe: Recipe, hardware: Hardware, configs: dict[str, ModelConfig], *, backend: str) -> Plan:
    roles = _roles_by_model(recipe)
    proposer_models = {r.model for r in recipe.proposer_roles()}
    budget = hardware.cpu_memory_bytes - CPU_RESERVE_BYTES
    estimates: dict[str, CpuEstimate] = {}
    contexts: dict[str, int] = {}

    # 1. every engine must fit the budget alone and hold one sequence of its context
    for model_id, model in configs.items():
        options = recipe.engine_options(model_id)
        est = estimate_cpu(model, options)
        context = required_context(recipe, model_id, max_context=model.architecture.max_context)
        if est.total_bytes > budget:
            fixes = [] if est.dtype != "float32" else ["dtype: bfloat16"]
            if est.kv_bytes > GIB // 2:
                fixes.append("cpu_kvcache_gib: 0.5")
            fixes.append("a larger --cpu-memory")
            fix = fixes[0] if len(fixes) == 1 else ", ".join(fixes[:-1]) + f", or {fixes[-1]}"
            raise PlacementError(
                f"'{model_id}' needs {est.total_bytes / GIB:.1f} GiB of CPU memory at {label(est)} (weights "
                f"{est.weights_bytes / GIB:.1f} GiB + KV {est.kv_bytes / GIB:.1f} GiB + engine processes, "
                f"tokenizers and packed lm_head {est.runtime_bytes / GIB:.1f} GiB); the CPU budget is "
                f"{max(0, budget) / GIB:.1f} GiB (--cpu-memory less {CPU_RESERVE_BYTES / GIB:.1f} GiB for the "
                f"orchestrator). Use {fix}."
            )
        if int(est.kv_tokens * CPU_KV_USABLE_FRACTION) < context:
            want = math.ceil(context * est.kv_per_token / CPU_KV_USABLE_FRACTION / GIB * 100) / 100
            raise PlacementError(
                f"'{model_id}' needs KV for {context} tokens ({context * est.kv_per_token / GIB:.2f} GiB at "
                f"{est.dtype}); cpu_kvcache_gib={est.kv_bytes / GIB:g} holds about "
                f"{int(est.kv_tokens * CPU_KV_USABLE_FRACTION)}. "
                f"Use cpu_kvcache_gib: {want:g} or a smaller max_model_len."
            )
        estimates[model_id], contexts[model_id] = est, context

    # 2. first-fit decreasing into phases by memory
    groups: list[list[str]] = []
    used: list[int] = []
    for model_id in sorted(configs, key=lambda m: (-estimates[m].total_bytes, m)):
        for i, group in enumerate(groups):
            if used[i] + estimates[model_id].total_bytes <= budget:
                group.append(model_id)
                used[i] += estimates[model_id].total_bytes
                break
        else:
            groups.append([model_id])
            used.append(estimates[model_id].total_bytes)
    order = _order_phases(
        groups,
        proposer_models=proposer_models,
        aggregator=recipe.aggregator_role().model,
        layers=recipe.layers,
    )
    phase_models = [sorted(groups[i], key=recipe.model_ids().index) for i in order]
    swap: Swap = "resident" if len(phase_models) == 1 else "reload"

    # 3. cores: the engines of a phase split the cores (a recipe's explicit cpu_threads wins)
    placements: dict[str, EnginePlacement] = {}
    loads: list[float] = []
    for p, models in enumerate(phase_models):
        auto = [m for m in models if recipe.engine_options(m).cpu_threads is None]
        explicit = [str(recipe.engine_options(m).cpu_threads) for m in models if m not in auto]
        binding = _core_split(hardware.core_ids(), auto, explicit)
        for model_id in models:
            est, options = estimates[model_id], recipe.engine_options(model_id)
            arch = configs[model_id].architecture
            placements[model_id] = EnginePlacement(
                id=model_id,
                roles=roles[model_id],
                phase=p,
                device="cpu",
                params_b=arch.params_b,
                dtype=est.dtype,
                quantization=est.quantization,
                weights_gib=round(est.weights_bytes / GIB, 2),
                kv_gib=round(est.kv_bytes / GIB, 2),
                kv_tokens=est.kv_tokens,
                max_model_len=options.max_model_len
                or min(arch.max_context, int(est.kv_tokens * CPU_KV_USABLE_FRACTION) // 16 * 16),
                min_context=contexts[model_id],
                cpu_threads=options.cpu_threads or binding[model_id],
                cpu_kvcache_gib=round(est.kv_bytes / GIB, 3),
                swap=swap,
                load_s=round(cold_load_s([est.weights_bytes], [CPU_ENGINE_START_S]), 1),
            )
        loads.append(cold_load_s([estimates[m].weights_bytes for m in models], [CPU_ENGINE_START_S]))

    schedule = _schedule(phase_models, recipe=recipe, proposer_models=proposer_models)
    cost = {
        (a, b): (SHUTDOWN_S + loads[b] if swap == "reload" else 0.0)
        for a in range(len(loads))
        for b in range(len(loads))
        if a != b
    }
    schedule, worst, total = switch_costs(schedule, cost, len(loads))
    return Plan(
        recipe=recipe.name,
        backend=backend,
        device="cpu",
        hardware=hardware.describe(),
        swap=swap,
        models=[placements[m] for m in recipe.model_ids()],
        phases=[
            Phase(
                index=p,
                models=phase_models[p],
                swap=swap,
                load_s=round(loads[p], 1),
                switch_in_s=round(worst[p], 1),
            )
            for p in range(len(phase_models))
        ],
        schedule=schedule,
        initial_load_s=round(loads[schedule[0].phase], 1),
        switch_s=round(total, 1),
        notes=[f"CPU budget {budget / GIB:.1f} GiB (--cpu-memory less the orchestrator's share)."],
    )


def _plan_fake(recipe: Recipe, hardware: Hardware, configs: dict[str, ModelConfig]) -> Plan:
    roles = _roles_by_model(recipe)
    models = recipe.model_ids()
    placements = [
        EnginePlacement(
            id=m,
            roles=roles[m],
            phase=0,
            device="none",
            params_b=configs[m].architecture.params_b,
            dtype=configs[m].dtype,
            quantization=None,
            weights_gib=0.0,
            kv_gib=0.0,
            kv_tokens=0,
            max_model_len=configs[m].architecture.max_context,
            min_context=0,
            swap="none",
        )
        for m in models
    ]
    proposer_models = {r.model for r in recipe.proposer_roles()}
    return Plan(
        recipe=recipe.name,
        backend="fake",
        device="none",
        hardware=hardware.describe(),
        swap="none",
        models=placements,
        phases=[Phase(index=0, models=models, swap="none", load_s=0.0, switch_in_s=0.0)],
        schedule=_schedule([models], recipe=recipe, proposer_models=proposer_models),
        initial_load_s=0.0,
        switch_s=0.0,
        notes=["fake backend: no weights, no memory."],
    )


def plan_recipe(
    recipe: Recipe,
    hardware: Hardware,
    *,
    backend: str | None = None,
    models: Mapping[str, ModelConfig] | None = None,
) -> Plan:
    """Place ``recipe`` on ``hardware``. ``backend`` defaults to the recipe's ('auto' is planned as vLLM);
    ``models`` overrides model configs by id (else they load from model_configs/). Raises PlacementError."""
    backend = backend or recipe.backend
    if backend not in ("auto", "vllm", "transformers", "fake"):
        raise PlacementError(f"unknown backend '{backend}'. Use auto, vllm, transformers or fake.")
    configs = _load_models(recipe, models)
    if backend == "fake":
        return _plan_fake(recipe, hardware, configs)
    if not hardware.has_gpus:
        return _plan_cpu(recipe, hardware, configs, backend=backend)
    return _plan_gpu(recipe, hardware, configs, backend=backend)
