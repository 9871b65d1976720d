"""The Plan: where every engine of a recipe lives, which engines are resident together (phases), and the order
the phased executor walks them (schedule). Plain data with a stable JSON form.

For the executor: ``plan.phases[i].models`` is the list of model ids resident together; ``plan.schedule`` is the
ordered list of steps (one per layer and phase, then the aggregation) naming the phase to make resident and the
roles to run there. Consecutive steps that share a phase need no swap.

Never computes anything (planner.py does) and never renders (report.py does).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Swap = Literal["resident", "sleep1", "sleep2", "reload", "mixed", "none"]
"""How engines leave and re-enter memory between phases.

resident: one phase, nothing moves. sleep1: vLLM sleep level 1 (weights to CPU RAM, KV dropped; wake copies them
back over PCIe). sleep2: vLLM sleep level 2 (weights and KV dropped, reloaded from disk on wake; the process,
CUDA graphs and compile cache stay). reload: the engine is shut down and started again. mixed: a phase or plan whose
engines differ (each EnginePlacement.swap says which). none: fake backend.
"""

Device = Literal["cuda", "cpu", "none"]


@dataclass(frozen=True)
class EnginePlacement:
    """One engine (one model; every role using the model shares it)."""

    id: str
    roles: list[str]
    phase: int
    device: Device
    params_b: float
    dtype: str
    quantization: str | None
    weights_gib: float
    """All weights, summed over the engine's GPUs (CPU: in CPU memory)."""
    kv_gib: float
    """KV cache, summed over the engine's GPUs."""
    kv_tokens: int
    """Tokens of KV cache (the sequences in flight share them)."""
    max_model_len: int
    """Context window to start the engine with: the recipe's, else (GPU) the context it needs, (CPU) what the planned
    KV cache holds, at most the model's."""
    min_context: int
    """Context the recipe needs (references + prompt + answer), at most the model's; on GPU the KV cache holds at
    least KV_HEADROOM times this and max_model_len is this."""
    gpus: list[int] = field(default_factory=list)
    """Global GPU indices (Hardware.slots()); on one node they equal the CUDA device indices."""
    nodes: list[int] = field(default_factory=list)
    tensor_parallel_size: int = 1
    memory_utilization: float | None = None
    """vLLM gpu_memory_utilization for this engine (its share of each of its GPUs)."""
    memory_gib_per_gpu: float = 0.0
    cpu_threads: str | None = None
    """vLLM-CPU core binding (VLLM_CPU_OMP_THREADS_BIND)."""
    cpu_kvcache_gib: float | None = None
    swap: Swap = "resident"
    """How this engine leaves and re-enters memory between phases."""
    asleep_gib_per_gpu: float = 0.0
    """What the engine keeps on each GPU while it sleeps (sleep1/sleep2); other phases' engines leave it room."""
    load_s: float = 0.0
    """Estimated cold start: read weights from disk + engine start."""
    max_num_batched_tokens: int | None = None
    """vLLM on GPU: tokens per step (its profiled activation peak), passed explicitly."""
    max_num_seqs: int | None = None
    """vLLM on GPU: sequences per step (its profiled sampler warm-up), passed explicitly."""
    context_bytes_per_gpu: int = 0
    """GPU: CUDA context and NCCL buffers, taken before vLLM's budget (memory_utilization x CUDA total) on each GPU."""

    @property
    def concurrency(self) -> int:
        """Sequences of max_model_len whose KV fits at once."""
        return self.kv_tokens // max(1, self.max_model_len)


@dataclass(frozen=True)
class Phase:
    """Engines resident together."""

    index: int
    models: list[str]
    swap: Swap
    load_s: float
    """Cold start of the whole phase (first phase of a run)."""
    switch_in_s: float
    """Bringing this phase in when the previous scheduled phase is resident (sleep/wake or reload)."""


@dataclass(frozen=True)
class Step:
    """One step of a run: make ``phase`` resident, then run ``roles`` for ``layer`` (or aggregate)."""

    kind: Literal["propose", "aggregate"]
    layer: int
    """1..layers for proposals; layers + 1 for the aggregation."""
    phase: int
    roles: list[str]
    switch_in_s: float = 0.0
    """The swap before this step along the schedule (0 when the previous step ran on the same phase)."""


@dataclass(frozen=True)
class Plan:
    """A recipe placed on hardware."""

    recipe: str
    backend: str
    device: Device
    hardware: str
    swap: Swap
    models: list[EnginePlacement]
    phases: list[Phase]
    schedule: list[Step]
    initial_load_s: float
    """Cold start of the first scheduled phase."""
    switch_s: float
    """Swap time of one pass through the schedule (per batch, not per conversation)."""
    notes: list[str] = field(default_factory=list)

    def engine(self, model_id: str) -> EnginePlacement:
        for e in self.models:
            if e.id == model_id:
                return e
        raise KeyError(model_id)

    def phase_models(self, index: int) -> list[str]:
        """Model ids resident together in phase ``index``."""
        return list(self.phases[index].models)

    @property
    def switches(self) -> int:
        """Phase changes in one pass through the schedule."""
        return sum(1 for a, b in zip(self.schedule, self.schedule[1:], strict=False) if a.phase != b.phase)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for engine, out in zip(self.models, data["models"], strict=True):
            out["concurrency"] = engine.concurrency
        data["switches"] = self.switches
        return data

    def to_json(self, *, indent: int | None = 2) -> str:
        """The plan as JSON: keys recipe, backend, device, hardware, swap, models, phases, schedule, ..."""
        return json.dumps(self.to_dict(), indent=indent)
