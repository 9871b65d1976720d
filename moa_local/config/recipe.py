"""Recipes: which models propose, which aggregates, how many layers, how each engine runs.

A recipe is closed YAML (unknown keys are errors). It names models by id; the registry checks that each id has a
model config. Nothing here imports an engine.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from moa_local.config.model import MODEL_ID_PATTERN

Backend = Literal["auto", "vllm", "transformers", "fake"]


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Sampling(_Closed):
    """Sampling parameters of one role. temperature 0 means greedy."""

    temperature: float = Field(0.7, ge=0, le=2, description="0 = greedy decoding.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    max_tokens: int = Field(512, gt=0, le=131072, description="Most tokens to generate.")
    seed: int | None = Field(None, description="Per-request seed for reproducible sampling.")
    stop: list[str] = Field(default_factory=list, description="Extra stop strings.")
    ignore_eos: bool = Field(False, description="Keep generating past end-of-sequence (benchmarks; vllm backend).")


class Role(_Closed):
    """A proposer or the aggregator: a model with its sampling and an optional system prompt."""

    model: str = Field(description="Model id (a file stem under model_configs/).")
    name: str | None = Field(None, description="Role name in traces; defaults to the model id.")
    sampling: Sampling = Field(default_factory=Sampling)
    system_prompt: str | None = Field(None, description="Extra system prompt for this role.")
    samples: int = Field(1, ge=1, le=64, description="Repeat this proposer N times (Self-MoA); seeds are offset.")

    def with_sampling(self, **changes: object) -> Role:
        """A copy with these sampling fields changed (``None`` values ignored); validated like the recipe."""
        update = {k: (list(v) if k == "stop" and isinstance(v, tuple) else v) for k, v in changes.items()
                  if v is not None}
        if not update:
            return self
        for key in update:
            if key not in Sampling.model_fields:
                raise ValueError(f"unknown sampling field '{key}'; expected one of {', '.join(Sampling.model_fields)}")
        return self.model_copy(update={"sampling": Sampling.model_validate({**self.sampling.model_dump(), **update})})

    @field_validator("model")
    @classmethod
    def _model_is_an_id(cls, value: str) -> str:
        if not re.fullmatch(MODEL_ID_PATTERN, value):
            raise ValueError(f"{value[:100]!r} is not a model id (lowercase letters, digits, '.', '_' and '-', "
                             "the name of a file under model_configs/ without .yaml; never a path)")
        return value


class FailurePolicy(_Closed):
    """What a layer does when proposers fail."""

    min_proposers: int = Field(1, ge=1, description="A conversation needs at least this many answers per layer.")
    retries: int = Field(1, ge=0, le=10, description="Times a failed proposer request is re-submitted.")


class FakeOptions(_Closed):
    """Options of the fake backend (tests, docs, dry runs)."""

    latency_s: float = Field(0.0, ge=0, description="Seconds each request takes (so tests can interrupt a job).")
    fail_if_contains: str | None = Field(None, description="Requests whose last message contains this text fail.")
    tokens_per_chunk: int = Field(1, ge=1, description="Words per streamed chunk.")
    max_model_len: int | None = Field(
        None, gt=0, description="Context in words (the fake's tokens): a prompt whose words + max_tokens exceed it "
        "fails with kind too_long, as a real engine's would. Unset: no limit."
    )
    token_delay_s: float = Field(
        0.0, ge=0, description="Seconds per generated word (a batch costs its longest answer), so TTFT is measurable."
    )


class EngineOptions(_Closed):
    """How one model's engine runs. Unset fields take the model config's or the backend's defaults."""

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="auto: model config default for the device.")
    max_model_len: int | None = Field(None, gt=0, description="Context window the engine reserves (prompt + output).")
    gpu_memory_utilization: float | None = Field(None, gt=0, le=1, description="vLLM: share of each GPU's memory.")
    kv_cache_memory_bytes: int | None = Field(None, gt=0, description="vLLM: exact KV cache size (overrides utilization).")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per engine (a power of two dividing the heads).")
    quantization: Literal["fp8", "awq", "gptq", "int8"] | None = Field(None, description="Weight quantization.")
    kv_cache_dtype: Literal["auto", "fp8"] = Field("auto", description="KV cache dtype.")
    enforce_eager: bool = Field(False, description="vLLM: no CUDA graphs / torch.compile (much faster start on CPU).")
    cpu_kvcache_gib: float | None = Field(None, gt=0, description="vLLM-CPU: KV cache GiB (VLLM_CPU_KVCACHE_SPACE).")
    cpu_threads: str | None = Field(
        None,
        description="vLLM-CPU: core binding (VLLM_CPU_OMP_THREADS_BIND), e.g. '0', '1', '0-1', 'auto'. "
        "Unset: the scheduler splits the cores between co-resident engines.",
    )
    enable_sleep_mode: bool | None = Field(
        None,
        description="vLLM on GPU: start the engine with sleep mode so it can be swapped out by sleep()/wake_up() "
        "instead of a reload. None: the planner decides (on for engines it swaps by sleeping). CUDA only.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="transformers backend: where to run.")
    gpus: list[int] | None = Field(
        None,
        description="vLLM on GPU: the plan's GPU indices for this engine (its worker gets CUDA_VISIBLE_DEVICES from "
        "them). Set by the planner; leave it unset in recipes (the plan's value replaces it).",
    )
    max_num_batched_tokens: int | None = Field(
        None, gt=0, description="vLLM on GPU: tokens per scheduler step (the activation peak vLLM profiles). None: "
        "the plan's value, passed explicitly because vLLM's own default depends on the card."
    )
    max_num_seqs: int | None = Field(
        None, gt=0, description="vLLM on GPU: sequences per step (the sampler warm-up vLLM profiles). None: the plan's."
    )
    distributed_executor_backend: Literal["mp", "ray"] | None = Field(
        None,
        description="vLLM: how a tensor-parallel engine runs its workers. None: vLLM decides; 'ray': vLLM's Ray "
        "executor (set by the Ray runner for engines whose GPUs come from a placement group, e.g. across nodes).",
    )
    fake: FakeOptions = Field(default_factory=FakeOptions)


class ClusterOptions(_Closed):
    """How the recipe runs on a Ray cluster (`--ray-address`). Ignored when it runs locally."""

    address: str | None = Field(
        None,
        description="Ray address used when --ray-address is not given: 'auto' (the cluster this machine joined), "
        "'ray://host:10001' (Ray Client), 'local' (a private one-machine cluster). None: run locally.",
    )
    max_restarts: int = Field(2, ge=0, le=10, description="Times Ray restarts an engine actor that died.")
    restart_timeout_s: float = Field(
        600.0, gt=0, description="How long a layer waits for a restarted engine (its model reloads) before failing its requests."
    )
    start_timeout_s: float = Field(900.0, gt=0, description="How long to wait for an engine actor to load its model.")
    placement_timeout_s: float = Field(
        120.0, gt=0, description="How long to wait for the cluster to reserve a placement group before giving up."
    )
    resources: dict[str, dict[str, float]] = Field(
        default_factory=dict,
        description="Per-model custom Ray resources its placement group must get, e.g. {gemma3-270m: {node2: 1}} "
        "to pin an engine to nodes started with `ray start --resources='{\"node2\": 1}'`.",
    )


class Recipe(_Closed):
    """A Mixture-of-Agents recipe."""

    name: str = Field(description="Recipe name.")
    description: str = Field("", description="One line for `recipes list`.")
    backend: Backend = Field("auto", description="auto: vllm if importable, else transformers (with a notice).")
    layers: int = Field(2, ge=1, le=16, description="Proposer layers before the aggregator.")
    proposers: list[Role] = Field(min_length=1, description="Proposer roles (each answers in every layer).")
    aggregator: Role = Field(description="The model that writes the final answer from the last layer.")
    policy: FailurePolicy = Field(default_factory=FailurePolicy)
    aggregation: Literal["full", "chunked"] = Field("full", description="full: wait for whole answers; chunked: stream.")
    chunk_tokens: int = Field(32, ge=1, description="chunked aggregation: tokens per proposer chunk.")
    engines: dict[str, EngineOptions] = Field(default_factory=dict, description="Per-model engine options.")
    cluster: ClusterOptions = Field(default_factory=ClusterOptions, description="Ray cluster options.")

    @model_validator(mode="after")
    def _check(self) -> Recipe:
        names = [r.name for r in self.proposer_roles()]
        if len(set(names)) != len(names):
            raise ValueError(f"proposer role names must be unique, got {names}; set `name:` on repeated models")
        if self.policy.min_proposers > len(names):
            raise ValueError(
                f"policy.min_proposers={self.policy.min_proposers} exceeds the {len(names)} proposer role(s)"
            )
        unused = set(self.engines) - set(self.model_ids())
        if unused:
            raise ValueError(f"engines: {sorted(unused)} are not used by any role")
        return self

    def proposer_roles(self) -> list[Role]:
        """Proposers with `samples` expanded: N roles named name#1..#N, seeds offset by the sample index."""
        roles: list[Role] = []
        for role in self.proposers:
            base = role.name or role.model
            if role.samples == 1:
                roles.append(role.model_copy(update={"name": base}))
                continue
            for i in range(role.samples):
                seed = None if role.sampling.seed is None else role.sampling.seed + i
                sampling = role.sampling.model_copy(update={"seed": seed if seed is not None else i})
                roles.append(role.model_copy(update={"name": f"{base}#{i + 1}", "samples": 1, "sampling": sampling}))
        return roles

    def aggregator_role(self) -> Role:
        return self.aggregator.model_copy(update={"name": self.aggregator.name or self.aggregator.model})

    def model_ids(self) -> list[str]:
        """Distinct models in first-use order; roles with the same model share one engine."""
        seen: dict[str, None] = {}
        for role in [*self.proposers, self.aggregator]:
            seen.setdefault(role.model, None)
        return list(seen)

    def engine_options(self, model_id: str) -> EngineOptions:
        return self.engines.get(model_id, EngineOptions())


def override_sampling(recipe: Recipe, **changes: object) -> Recipe:
    """A copy of ``recipe`` with the given sampling fields (max_tokens, temperature, seed, ...) set on every role.
    ``None`` values are ignored."""
    if all(v is None for v in changes.values()):
        return recipe
    return recipe.model_copy(update={"proposers": [r.with_sampling(**changes) for r in recipe.proposers],
                                     "aggregator": recipe.aggregator.with_sampling(**changes)})
