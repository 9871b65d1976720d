"""Swaps and shares: how engines of different phases take turns on the same GPUs, and what that costs.

Owns the per-engine swap method (vLLM sleep level 1 / 2, or reload), the memory share of co-resident engines
(their gpu_memory_utilization, after what sleeping engines keep), and the time estimates (cold start, phase
switches) with their bandwidth constants. Package-internal: planner.py drives it. Never places engines
(packing.py), never imports torch or vllm.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from moa_local.placement.hardware import GpuSlot, Hardware
from moa_local.placement.packing import Candidate, PhaseFill, Placed, usable
from moa_local.placement.plan import Step, Swap

CPU_PINNED_FRACTION = 0.8
"""Sleep level 1 parks weights in pinned CPU RAM; at most this share of CPU memory may hold them."""

DISK_BYTES_PER_S = 2e9
"""Reading safetensors from local NVMe into the engine (~2 GB/s)."""

PCIE_BYTES_PER_S = 25e9
"""Host <-> GPU copies of pinned memory (PCIe 4/5 x16 in practice, ~25 GB/s); GPUs copy in parallel."""

ENGINE_START_S = 30.0
"""vLLM GPU engine start beyond reading weights: profiling, KV allocation, torch.compile, CUDA graph capture."""

ENGINE_START_EAGER_S = 10.0
"""The same with enforce_eager (no compile, no graphs)."""

CPU_ENGINE_START_S = 30.0
"""vLLM-CPU engine start beyond reading weights: import vllm, spawn the EngineCore and its worker, allocate the KV
cache. Measured 21-45 s for the tiny models on an idle 2-core machine (FACTS.md), 40-75 s on a busy one."""

WAKE_S = 1.0
"""Fixed cost of a sleep/wake round (RPCs, re-mapping memory)."""

SHUTDOWN_S = 5.0
"""Stopping an engine process and releasing its GPU memory."""


def residuals(states: list[PhaseFill], p: int, gpu: int, swaps: Mapping[str, Swap]) -> int:
    """What sleeping engines of the other phases keep on ``gpu`` while phase ``p`` runs."""
    return sum(
        s.engine.estimates[s.tp].sleep_residual_per_gpu
        for q, state in enumerate(states)
        if q != p
        for s in state.slots
        if gpu in s.gpus and swaps[s.engine.id] in ("sleep1", "sleep2")
    )


def choose_gpu_swaps(
    states: list[PhaseFill], gpu_slots: list[GpuSlot], hardware: Hardware, *, backend: str, fraction: float
) -> dict[str, Swap]:
    """Per engine: vLLM sleep where the residue of sleeping engines still leaves room on the GPUs, else reload
    (the cheapest engines to reload go first); sleep level 1 while CPU RAM holds the parked weights, level 2 for
    the biggest engines beyond that.
    One phase: all resident. The transformers backend cannot sleep: all reload."""
    ids = [s.engine.id for state in states for s in state.slots]
    if len(states) == 1:
        return dict.fromkeys(ids, "resident")
    if backend == "transformers":
        return dict.fromkeys(ids, "reload")
    swaps: dict[str, Swap] = dict.fromkeys(ids, "sleep1")
    while True:
        overflow = next(
            (
                (p, s.index)
                for p, state in enumerate(states)
                for s in gpu_slots
                if sum(x.engine.need(x.tp, s.spec.cuda_bytes) or 0 for x in state.engines_on(s.index))
                + residuals(states, p, s.index, swaps)
                > usable(s, fraction)
            ),
            None,
        )
        if overflow is None:
            break
        p, gpu = overflow
        sleepers = [
            x
            for q, state in enumerate(states)
            if q != p
            for x in state.slots
            if gpu in x.gpus and swaps[x.engine.id] == "sleep1"
        ]
        cheapest = min(sleepers, key=lambda x: (x.engine.estimates[x.tp].weights_bytes, x.engine.id))
        swaps[cheapest.engine.id] = "reload"
    while True:
        crowded = next(
            (p for p in range(len(states)) if parked_too_much(states, p, gpu_slots, hardware, swaps)), None
        )
        if crowded is None:
            return swaps
        parked = [
            x
            for q, state in enumerate(states)
            if q != crowded
            for x in state.slots
            if swaps[x.engine.id] == "sleep1"
        ]
        biggest = max(parked, key=lambda x: (x.engine.estimates[x.tp].weights_bytes, x.engine.id))
        swaps[biggest.engine.id] = "sleep2"


def parked_too_much(
    states: list[PhaseFill], p: int, gpu_slots: list[GpuSlot], hardware: Hardware, swaps: Mapping[str, Swap]
) -> bool:
    """Whether the weights sleep-level-1 engines park in CPU RAM while phase ``p`` runs overflow a node's RAM."""
    parked: dict[int, int] = {}
    for q, state in enumerate(states):
        for x in state.slots:
            if q != p and swaps[x.engine.id] == "sleep1":
                for g in x.gpus:
                    node = gpu_slots[g].node
                    parked[node] = parked.get(node, 0) + x.engine.estimates[x.tp].weights_per_gpu
    return any(v > hardware.cpu_memory_bytes * CPU_PINNED_FRACTION for v in parked.values())


def gpu_shares(
    states: list[PhaseFill], gpu_slots: list[GpuSlot], *, fraction: float, swaps: Mapping[str, Swap]
) -> dict[str, dict[int, int]]:
    """Bytes each engine may use on each of its GPUs: its need plus a need-proportional part of the leftover
    (after the residue of sleeping engines)."""
    shares: dict[str, dict[int, int]] = {}
    for p, state in enumerate(states):
        for s in gpu_slots:
            here = state.engines_on(s.index)
            if not here:
                continue
            available = usable(s, fraction) - residuals(states, p, s.index, swaps)
            needs = {x.engine.id: x.engine.need(x.tp, s.spec.cuda_bytes) or 0 for x in here}
            flexible = sum(needs[x.engine.id] for x in here if x.engine.flexible)
            extra = max(0, available - sum(needs.values()))
            for x in here:
                share = needs[x.engine.id]
                if x.engine.flexible and flexible:
                    share += extra * share // flexible
                shares.setdefault(x.engine.id, {})[s.index] = share
    return shares


def overall(swaps: list[Swap]) -> Swap:
    """One word for several engines: their common swap method, or 'mixed'."""
    return swaps[0] if len(set(swaps)) == 1 else "mixed"


# -- time estimates ------------------------------------------------------------------------------------------------


def cold_load_s(weights_bytes: list[int], starts: list[float]) -> float:
    """Engines of a phase start together: they share the disk, their start-ups overlap."""
    return sum(weights_bytes) / DISK_BYTES_PER_S + max(starts, default=0.0)


def start_s(engine: Candidate) -> float:
    """vLLM start-up beyond reading weights."""
    return ENGINE_START_EAGER_S if engine.options.enforce_eager else ENGINE_START_S


def switch_s(leaving: list[Placed], entering: list[Placed], swaps: Mapping[str, Swap]) -> float:
    """Out, then in. sleep1 moves each GPU's weights over PCIe (GPUs in parallel); sleep2 and reload read weights
    from the shared disk; reload also stops and starts processes."""

    def pcie(slots: list[Placed]) -> float:
        per_gpu: dict[int, int] = {}
        for x in slots:
            if swaps[x.engine.id] == "sleep1":
                for g in x.gpus:
                    per_gpu[g] = per_gpu.get(g, 0) + x.engine.estimates[x.tp].weights_per_gpu
        return max(per_gpu.values(), default=0) / PCIE_BYTES_PER_S

    out = pcie(leaving)
    if any(swaps[x.engine.id] == "reload" for x in leaving):
        out = max(out, SHUTDOWN_S)
    disk = [
        x.engine.estimates[x.tp].weights_bytes for x in entering if swaps[x.engine.id] in ("sleep2", "reload")
    ]
    starts = [start_s(x.engine) for x in entering if swaps[x.engine.id] == "reload"]
    sleepers = any(swaps[x.engine.id] in ("sleep1", "sleep2") for x in entering)
    into = max(pcie(entering), cold_load_s(disk, starts) if disk else 0.0) + (WAKE_S if sleepers else 0.0)
    return out + into


def switch_costs(
    schedule: list[Step], cost: dict[tuple[int, int], float], n: int
) -> tuple[list[Step], list[float], float]:
    """Walk the schedule: its steps with the swap before each (``Step.switch_in_s``), the worst switch into each
    phase, and the total of one pass (per batch)."""
    worst = [0.0] * n
    total = 0.0
    steps = schedule[:1]
    for a, b in zip(schedule, schedule[1:], strict=False):
        c = cost[(a.phase, b.phase)] if a.phase != b.phase else 0.0
        worst[b.phase] = max(worst[b.phase], c)
        total += c
        steps.append(replace(b, switch_in_s=round(c, 1)))
    return steps, worst, total
