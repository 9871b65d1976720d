"""GPU packing: which tensor-parallel size and which GPUs each engine gets, and how engines group into phases.

Owns the per-GPU need of an engine (weights / TP + overhead + KV for its required context), best-fit placement on
one node (spanning nodes only when it must), first-fit-decreasing packing into phases, widening TP onto idle GPUs,
and the PlacementError for an engine that fits nowhere, with the fix that would fit. Package-internal: planner.py
drives it. Never orders phases, never chooses swaps (swaps.py), never imports torch or vllm.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from moa_local.config.model import ModelConfig
from moa_local.config.recipe import EngineOptions, Recipe
from moa_local.errors import PlacementError
from moa_local.placement.hardware import GpuSlot
from moa_local.placement.memory import (
    GIB,
    CpuEstimate,
    GpuEstimate,
    estimate_gpu,
    valid_tensor_parallel_sizes,
)

MAX_GPU_UTILIZATION = 0.90
"""Share of each GPU the planner hands out (vLLM's default gpu_memory_utilization); a recipe that sets a higher
gpu_memory_utilization raises it, up to 0.98."""

SHARE_SLACK_BYTES = 16 * 1024**2
"""Added to each engine's need so rounding gpu_memory_utilization down to 4 decimals never costs KV it needs."""


@dataclass
class Candidate:
    """An engine being planned: its model, options, roles and per-TP estimates."""

    model: ModelConfig
    options: EngineOptions
    roles: list[str]
    proposes: bool
    context: int
    tps: list[int]
    explicit_tp: bool
    estimates: dict[int, GpuEstimate] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return self.model.id

    def need(self, tp: int, gpu_bytes: int) -> int | None:
        """Bytes this engine claims on one GPU whose CUDA total is ``gpu_bytes`` at ``tp``; None if it cannot run
        there."""
        est = self.estimates[tp]
        minimum = est.need_per_gpu(self.context)
        if self.options.gpu_memory_utilization is not None:  # vLLM's budget, after the context and NCCL
            share = est.context_bytes + int(self.options.gpu_memory_utilization * gpu_bytes)
            return share if share >= minimum else None
        if self.options.kv_cache_memory_bytes is not None:
            kv = self.options.kv_cache_memory_bytes
            return est.fixed_per_gpu + kv if kv >= est.kv_per_token_per_gpu * self.context else None
        return minimum + SHARE_SLACK_BYTES

    @property
    def flexible(self) -> bool:
        """Whether leftover memory on its GPUs may be given to this engine's KV cache."""
        return self.options.gpu_memory_utilization is None and self.options.kv_cache_memory_bytes is None


@dataclass
class Placed:
    """An engine placed in a phase."""

    engine: Candidate
    tp: int
    gpus: list[int]


@dataclass
class PhaseFill:
    """A phase being filled: free bytes left on each GPU (global index) and the engines placed so far."""

    free: dict[int, int]
    slots: list[Placed] = field(default_factory=list)

    def engines_on(self, gpu: int) -> list[Placed]:
        return [s for s in self.slots if gpu in s.gpus]


def label(est: GpuEstimate | CpuEstimate) -> str:
    """'bf16', 'fp32', 'fp8', 'awq' ... for messages."""
    short = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
    return est.quantization or short[est.dtype]


def usable(slot: GpuSlot, fraction: float) -> int:
    """Bytes of a GPU the planner may hand out."""
    return int(slot.spec.cuda_bytes * fraction)


def try_place(
    engine: Candidate,
    state: PhaseFill,
    gpu_slots: list[GpuSlot],
    *,
    allow_span: bool,
    tps: list[int] | None = None,
) -> Placed | None:
    """Smallest TP that fits this phase's free memory, on one node (best fit: the fullest GPUs that still fit)."""
    nodes = sorted({s.node for s in gpu_slots})
    for tp in tps or engine.tps:
        best: tuple[int, list[int]] | None = None
        groups = [[s for s in gpu_slots if s.node == n] for n in nodes]
        if allow_span:
            groups = [gpu_slots]
        for group in groups:
            fits = []
            for s in group:
                need = engine.need(tp, s.spec.cuda_bytes)
                if need is not None and need <= state.free[s.index]:
                    fits.append((state.free[s.index] - need, s.node, s.index))
            if len(fits) < tp:
                continue
            fits.sort()
            if allow_span:
                fits.sort(key=lambda f: (f[1], f[0], f[2]))
            chosen = fits[:tp]
            leftover = sum(f[0] for f in chosen)
            if best is None or leftover < best[0]:
                best = (leftover, sorted(f[2] for f in chosen))
        if best is not None:
            return Placed(engine=engine, tp=tp, gpus=best[1])
    return None


def commit(state: PhaseFill, slot: Placed, gpu_slots: list[GpuSlot]) -> None:
    for g in slot.gpus:
        need = slot.engine.need(slot.tp, gpu_slots[g].spec.cuda_bytes)
        assert need is not None
        state.free[g] -= need
    state.slots.append(slot)


def empty_state(gpu_slots: list[GpuSlot], fraction: float) -> PhaseFill:
    return PhaseFill(free={s.index: usable(s, fraction) for s in gpu_slots})


def infeasible_gpu(engine: Candidate, gpu_slots: list[GpuSlot], fraction: float) -> PlacementError:
    """The error for an engine that fits no GPU set even alone: its need, the biggest set, and what would fit."""
    arch = engine.model.architecture
    fixed = (
        engine.options.gpu_memory_utilization is not None or engine.options.kv_cache_memory_bytes is not None
    )
    free = _trial(engine, tps=engine.tps, gpu_memory_utilization=None, kv_cache_memory_bytes=None)
    if fixed and _fits_alone(free, gpu_slots, fraction):
        tp = engine.tps[0]
        est, card = engine.estimates[tp], max(gpu_slots, key=lambda s: s.spec.cuda_bytes).spec
        want = est.need_per_gpu(engine.context) + SHARE_SLACK_BYTES
        return PlacementError(
            f"'{engine.id}' needs {want / GIB:.1f} GiB per GPU at tensor_parallel_size={tp} (weights "
            f"{est.weights_per_gpu / GIB:.1f} GiB, KV for {engine.context} tokens, overhead), more than its "
            f"gpu_memory_utilization / kv_cache_memory_bytes allow on a {card.name}. Use "
            f"gpu_memory_utilization: {math.ceil((want - est.context_bytes) / card.cuda_bytes * 100) / 100:.2f} or "
            "remove the setting."
        )
    by_node: dict[int, list[GpuSlot]] = {}
    for s in gpu_slots:
        by_node.setdefault(s.node, []).append(s)
    biggest = sorted(
        max(by_node.values(), key=lambda g: sum(s.spec.cuda_bytes for s in g)),
        key=lambda s: -s.spec.cuda_bytes,
    )
    tp = engine.tps[0] if engine.explicit_tp else 1
    est = estimate_gpu(engine.model, engine.options, tensor_parallel_size=tp)
    group = biggest[
        : tp if engine.explicit_tp else max(valid_tensor_parallel_sizes(arch, limit=len(biggest)))
    ]
    capacity = sum(s.spec.cuda_bytes for s in group)
    head = (
        f"'{engine.id}' needs {est.need_per_gpu(engine.context) * tp / GIB:.1f} GiB at {label(est)} (weights "
        f"{est.weights_bytes / GIB:.1f} GiB, KV for {engine.context} tokens, overhead); the largest GPU set it may "
        f"use ({len(group)}x {group[0].spec.name}) has {capacity / GIB:.1f} GiB, "
        f"{capacity * fraction / GIB:.1f} GiB usable at {fraction:.2f} utilization."
    )
    fixes: list[str] = []
    every_tp = valid_tensor_parallel_sizes(arch, limit=len(gpu_slots))
    if engine.explicit_tp:
        bigger = [t for t in every_tp if t > tp and _fits_alone(_trial(engine, tps=[t]), gpu_slots, fraction)]
        if bigger:
            fixes.append(f"tensor_parallel_size={bigger[0]}")
    rank = {None: 0, "int8": 1, "fp8": 1, "gptq": 2, "awq": 2}
    for quant in ("fp8", "awq"):
        if rank[quant] > rank[engine.options.quantization]:
            trial = _trial(engine, tps=engine.tps, quantization=quant)
            if _fits_alone(trial, gpu_slots, fraction):
                fixes.append(f"quantization: {quant}")
                break
    shorter = _trial(engine, tps=engine.tps, max_model_len=4096)
    if (
        engine.options.max_model_len is None
        and engine.context > 4096
        and _fits_alone(shorter, gpu_slots, fraction)
    ):
        fixes.append("max_model_len: 4096")
    card = biggest[0].spec
    more = [
        t
        for t in valid_tensor_parallel_sizes(arch, limit=64)
        if t > len(biggest)
        and (_trial(engine, tps=[t]).need(t, card.cuda_bytes) or math.inf) <= card.cuda_bytes * fraction
    ]
    if more:
        fixes.append(f"{more[0]} GPUs like these (tensor_parallel_size={more[0]})")
    elif not fixes:
        fixes.append("larger GPUs")
    fix = fixes[0] if len(fixes) == 1 else ", ".join(fixes[:-1]) + f", or {fixes[-1]}"
    return PlacementError(f"{head} Use {fix}.")


def _trial(engine: Candidate, *, tps: list[int], **update: object) -> Candidate:
    """The same engine with other TP sizes or options, for "what would fit" suggestions."""
    options = engine.options.model_copy(update=update)
    context = options.max_model_len if "max_model_len" in update and options.max_model_len else engine.context
    trial = Candidate(
        model=engine.model,
        options=options,
        roles=engine.roles,
        proposes=engine.proposes,
        context=context,
        tps=tps,
        explicit_tp=engine.explicit_tp,
    )
    trial.estimates = {t: estimate_gpu(engine.model, options, tensor_parallel_size=t) for t in tps}
    return trial


def _fits_alone(engine: Candidate, gpu_slots: list[GpuSlot], fraction: float) -> bool:
    state = empty_state(gpu_slots, fraction)
    return any(try_place(engine, state, gpu_slots, allow_span=span) is not None for span in (False, True))


def gpu_candidates(
    recipe: Recipe,
    configs: dict[str, ModelConfig],
    *,
    roles: dict[str, list[str]],
    contexts: dict[str, int],
    n_gpus: int,
) -> list[Candidate]:
    """One candidate per model, with its TP options (the recipe's, or every valid size up to ``n_gpus``)."""
    proposer_models = {r.model for r in recipe.proposer_roles()}
    engines = []
    for model_id, model in configs.items():
        options = recipe.engine_options(model_id)
        arch = model.architecture
        explicit = "tensor_parallel_size" in options.model_fields_set
        if explicit:
            tp = options.tensor_parallel_size
            if tp not in valid_tensor_parallel_sizes(arch, limit=tp):
                raise PlacementError(
                    f"'{model_id}': tensor_parallel_size={tp} must be a power of two dividing its "
                    f"{arch.num_attention_heads} attention heads and {arch.num_kv_heads} KV heads. "
                    f"Use one of {valid_tensor_parallel_sizes(arch, limit=64)}."
                )
            if tp > n_gpus:
                raise PlacementError(
                    f"'{model_id}': tensor_parallel_size={tp} needs {tp} GPUs; the hardware has {n_gpus}. "
                    f"Use tensor_parallel_size={max(valid_tensor_parallel_sizes(arch, limit=n_gpus))} or more GPUs."
                )
            tps = [tp]
        else:
            tps = valid_tensor_parallel_sizes(arch, limit=n_gpus)
        engine = Candidate(
            model=model,
            options=options,
            roles=roles[model_id],
            proposes=model_id in proposer_models,
            context=contexts[model_id],
            tps=tps,
            explicit_tp=explicit,
        )
        engine.estimates = {tp: estimate_gpu(model, options, tensor_parallel_size=tp) for tp in tps}
        engines.append(engine)
    return engines


def pack_gpu(engines: list[Candidate], gpu_slots: list[GpuSlot], fraction: float) -> list[PhaseFill]:
    """First-fit decreasing of engines into phases; every engine must fit alone, else PlacementError."""
    span: dict[str, bool] = {}
    size: dict[str, int] = {}
    for engine in engines:
        alone = empty_state(gpu_slots, fraction)
        slot = try_place(engine, alone, gpu_slots, allow_span=False)
        span[engine.id] = slot is None
        if slot is None:
            slot = try_place(engine, alone, gpu_slots, allow_span=True)
        if slot is None:
            raise infeasible_gpu(engine, gpu_slots, fraction)
        size[engine.id] = sum(engine.need(slot.tp, gpu_slots[g].spec.cuda_bytes) or 0 for g in slot.gpus)
    phases: list[PhaseFill] = []
    for engine in sorted(engines, key=lambda e: (-size[e.id], e.id)):
        for state in phases:
            slot = try_place(engine, state, gpu_slots, allow_span=span[engine.id])
            if slot is not None:
                commit(state, slot, gpu_slots)
                break
        else:
            state = empty_state(gpu_slots, fraction)
            slot = try_place(engine, state, gpu_slots, allow_span=span[engine.id])
            assert slot is not None
            commit(state, slot, gpu_slots)
            phases.append(state)
    for state in phases:
        widen(state, gpu_slots)
    return phases


def widen(state: PhaseFill, gpu_slots: list[GpuSlot]) -> None:
    """Give idle GPUs of a phase to engines that own their GPUs alone: double their TP (more KV, faster)."""
    changed = True
    while changed:
        changed = False
        used = {g for s in state.slots for g in s.gpus}
        for slot in sorted(state.slots, key=lambda s: -s.engine.estimates[s.tp].weights_per_gpu):
            engine, tp = slot.engine, slot.tp
            if (
                engine.explicit_tp
                or not engine.flexible
                or any(len(state.engines_on(g)) > 1 for g in slot.gpus)
            ):
                continue
            node = gpu_slots[slot.gpus[0]].node
            if any(gpu_slots[g].node != node for g in slot.gpus):
                continue
            idle = [s.index for s in gpu_slots if s.node == node and s.index not in used]
            wider = 2 * tp
            if len(idle) < tp or wider not in valid_tensor_parallel_sizes(
                engine.model.architecture, limit=wider
            ):
                continue
            new_gpus = sorted(slot.gpus + idle[:tp])
            engine.estimates.setdefault(
                wider, estimate_gpu(engine.model, engine.options, tensor_parallel_size=wider)
            )
            needs = [engine.need(wider, gpu_slots[g].spec.cuda_bytes) for g in new_gpus]
            free_after = [
                state.free[g]
                + (engine.need(tp, gpu_slots[g].spec.cuda_bytes) or 0 if g in slot.gpus else 0)
                for g in new_gpus
            ]
            if any(n is None or n > f for n, f in zip(needs, free_after, strict=True)):
                continue
            for g in slot.gpus:
                state.free[g] += engine.need(tp, gpu_slots[g].spec.cuda_bytes) or 0
            state.slots.remove(slot)
            commit(state, Placed(engine=engine, tp=wider, gpus=new_gpus), gpu_slots)
            changed = True
            break
