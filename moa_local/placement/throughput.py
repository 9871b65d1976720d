"""Engine speed: how long one vLLM engine takes for a decode step and for a prefill. Pure arithmetic.

Two sources behind one small interface (``EngineSpeed``):

* **GPU: a roofline with efficiency factors** (``RooflineSpeed``). A decode step of ``B`` sequences with ``C``
  tokens of context in all reads every weight shard once (for MoE, the experts the batch touches) and every
  sequence's KV cache, and does ``2 x active parameters`` FLOPs per sequence plus attention::

      bytes = W_dense/TP + W_experts/TP x (1 - (1 - k/E)^B) + C x KV bytes per token per GPU
      flops = (2 x P_active x B + 4 x layers x n_q x d x C) / TP
      step  = max(bytes / (bandwidth x MEMORY_EFFICIENCY), flops / (peak x DECODE_COMPUTE_EFFICIENCY))
              + layers x TP_LAYER_OVERHEAD_S (TP > 1) + B x SEQUENCE_OVERHEAD_S

  A prefill of prompts of ``p`` tokens is compute-bound: ``(2 x P_active x sum p + 2 x layers x n_q x d x sum p^2)
  / TP / (peak x PREFILL_EFFICIENCY)``. The efficiency constants are fitted to published vLLM measurements
  (docs/forecast.md lists each source and how well the model reproduces the others).
* **CPU: a calibration** (``CalibratedSpeed``): this machine's measured step time ``a + b_mode x B + c x C``
  (per sampling mode: top-p sorts the vocabulary every step) and prefill time ``alpha x sum p + beta x sum p^2``,
  fitted by calibration.py.

Never imports torch or vllm, never schedules (forecast.py does), never measures (calibration.py does).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol

from moa_local.config.model import ModelConfig
from moa_local.config.recipe import EngineOptions, Sampling
from moa_local.placement.cards import CardPerf
from moa_local.placement.memory import (
    DTYPE_BYTES,
    QUANT_WEIGHT_BYTES,
    count_params,
    estimate_gpu,
    resolve_dtype,
)
from moa_local.placement.plan import EnginePlacement

Mode = Literal["greedy", "sample", "top_p"]
"""How a role samples. On CPU the cost per sequence differs: top-p (or top-k) sorts the whole vocabulary each step."""

MODES: tuple[Mode, ...] = ("greedy", "sample", "top_p")

MEMORY_EFFICIENCY = 0.77
"""Share of the datasheet memory bandwidth a decode step reaches. vLLM (V1) decoding Llama-3.1-8B at batch 1 on one
A100-40GB ran at ~75 tok/s, 77 % of the bandwidth ceiling (johnmusgrave.com, "vLLM throughput-latency sweep on
NVIDIA A100")."""

TP_LAYER_OVERHEAD_S = 109e-6
"""Per decoder layer per decode step of a tensor-parallel engine: its two all-reduces and launch gaps. Fitted to
Qwen2.5-72B-Instruct, bf16, TP 4 on A100-80GB, batch 1: 31.37 tok/s with vLLM 0.6.3 (Qwen2.5 speed benchmark,
qwen.readthedocs.io); the bandwidth term alone gives 23.2 ms of the measured 31.9 ms per token."""

SEQUENCE_OVERHEAD_S = 100e-6
"""Per running sequence per decode step: scheduling, input preparation, sampling and detokenizing (the CPU work the
vLLM v0.6.0 blog measured as the bottleneck). Fitted to Llama-3.1-70B-Instruct, bf16, TP 4 on 4xH100, 5,000
ShareGPT prompts: 3,700.64 output tok/s with vLLM 0.6.0 (sgl-project/sglang, benchmark/benchmark_vllm_060)."""

MOE_EFFICIENCY = 0.37
"""Mixture-of-experts engines reach this share of a dense model's efficiency (vLLM's fused MoE kernels, expert load
imbalance), on decode and prefill alike. Fitted so that Mixtral-8x22B and Llama-3-70B, measured with one harness
on the same cards (LambdaLabsML/vllm-benchmark, 320 ShareGPT prompts, TP 4, vLLM 0.5.4, 4xH100 and 4xA100), come
out equally far from their measurements."""

DECODE_COMPUTE_EFFICIENCY = 0.6
"""Share of dense tensor peak reached by decode GEMMs once a large batch makes them compute-bound."""

PREFILL_EFFICIENCY = 0.5
"""Share of dense tensor peak reached by prefill (large GEMMs plus flash attention). An assumption: no published
vLLM prefill-only throughput for these cards was found; the check against published end-to-end throughput in
docs/forecast.md includes it."""

CPU_MAX_NUM_SEQS = 256
"""vLLM-CPU's default cap on running sequences for an offline ``LLM`` (vllm/engine/arg_utils.py, 256 x world size)."""


def sampling_mode(sampling: Sampling) -> Mode:
    """greedy (temperature 0), top_p (nucleus mass below 1: a sort of the vocabulary per step), else sample."""
    if sampling.temperature == 0:
        return "greedy"
    return "top_p" if sampling.top_p < 1 else "sample"


class EngineSpeed(Protocol):
    """How fast one engine works; every time in seconds."""

    @property
    def max_batch(self) -> int:
        """Sequences the engine runs at once at most (vLLM's max_num_seqs)."""
        ...

    @property
    def source(self) -> str:
        """Where the numbers come from, for people."""
        ...

    def step_s(self, batch: Mapping[Mode, int], context: float) -> float:
        """One decode step of ``batch`` sequences (by sampling mode) holding ``context`` tokens of KV in all."""
        ...

    def prefill_s(self, tokens: float, tokens_sq: float) -> float:
        """Prefilling prompts of ``tokens`` tokens in all, whose squared lengths sum to ``tokens_sq``."""
        ...


@dataclass(frozen=True)
class RooflineSpeed:
    """A vLLM engine on GPUs (see the module doc for the formulas)."""

    dense_bytes_per_gpu: float
    expert_bytes_per_gpu: float
    experts: int
    experts_per_token: int
    active_params: float
    """Parameters one token multiplies through: attention, active experts' FFN (or the dense FFN), router, lm_head."""
    layers: int
    attention_width: int
    """Query heads x head_dim."""
    kv_bytes_per_token: float
    """Per GPU of the engine."""
    tensor_parallel: int
    bandwidth: float
    flops: float
    max_batch: int
    source: str

    def _expert_share(self, batch: float) -> float:
        if not self.experts:
            return 1.0
        return 1.0 - (1.0 - self.experts_per_token / self.experts) ** max(1.0, batch)

    def step_s(self, batch: Mapping[Mode, int], context: float) -> float:
        b = float(sum(batch.values()))
        if b <= 0:
            return 0.0
        read = self.dense_bytes_per_gpu + self.expert_bytes_per_gpu * self._expert_share(b) + context * self.kv_bytes_per_token
        work = (2 * self.active_params * b + 4 * self.layers * self.attention_width * context) / self.tensor_parallel
        hardware = max(read / (self.bandwidth * MEMORY_EFFICIENCY), work / (self.flops * DECODE_COMPUTE_EFFICIENCY))
        if self.experts:
            hardware /= MOE_EFFICIENCY
        sync = self.layers * TP_LAYER_OVERHEAD_S if self.tensor_parallel > 1 else 0.0
        return hardware + sync + b * SEQUENCE_OVERHEAD_S

    def prefill_s(self, tokens: float, tokens_sq: float) -> float:
        work = (2 * self.active_params * tokens + 2 * self.layers * self.attention_width * tokens_sq) / self.tensor_parallel
        return work / (self.flops * PREFILL_EFFICIENCY * (MOE_EFFICIENCY if self.experts else 1.0))


def active_params(model: ModelConfig) -> float:
    """Parameters a token multiplies through (the embedding lookup is free; the lm_head is a matmul even when tied)."""
    arch = model.architecture
    p = count_params(arch)
    ffn = p.ffn * (arch.experts_per_token / arch.num_experts if arch.num_experts else 1.0)
    return p.attention + ffn + p.router + arch.vocab_size * arch.hidden_size


def roofline_speed(engine: EnginePlacement, model: ModelConfig, options: EngineOptions, card: CardPerf, *,
                   max_batch: int) -> RooflineSpeed:
    """The roofline of ``engine`` (as placed: its dtype, quantization and TP) on ``card``."""
    arch = model.architecture
    tp = engine.tensor_parallel_size
    est = estimate_gpu(model, options, tensor_parallel_size=tp)
    params = count_params(arch)
    dtype = resolve_dtype(model, options, device="cuda")
    per_weight = QUANT_WEIGHT_BYTES[options.quantization] if options.quantization else DTYPE_BYTES[dtype]
    experts = params.ffn * per_weight if arch.num_experts else 0.0
    fp8 = options.quantization == "fp8"
    return RooflineSpeed(
        dense_bytes_per_gpu=(est.weights_bytes - experts) / tp,
        expert_bytes_per_gpu=experts / tp,
        experts=arch.num_experts,
        experts_per_token=arch.experts_per_token,
        active_params=active_params(model),
        layers=arch.num_layers,
        attention_width=arch.num_attention_heads * arch.head_dim,
        kv_bytes_per_token=est.kv_per_token_per_gpu,
        tensor_parallel=tp,
        bandwidth=card.memory_bandwidth,
        flops=card.flops(fp8=fp8),
        max_batch=max_batch,
        source=f"roofline on {card.name}" + (" (fp8 tensor cores)" if fp8 and card.fp8_flops else ""),
    )


@dataclass(frozen=True)
class CalibratedSpeed:
    """A vLLM-CPU engine as this machine measured it (calibration.py fits the coefficients)."""

    step_base_s: float
    """a: a decode step's fixed cost (reading the weights once)."""
    step_per_seq_s: dict[str, float]
    """b by sampling mode: each running sequence's own cost per step (its lm_head row, sampling)."""
    step_per_context_s: float
    """c: per token of KV context per step (attention)."""
    prefill_per_token_s: float
    prefill_per_token_sq_s: float
    source: str
    max_batch: int = CPU_MAX_NUM_SEQS
    notes: list[str] = field(default_factory=list)

    def per_seq(self, mode: Mode) -> float:
        """b of ``mode``; a mode the calibration did not measure borrows the nearest one that it did."""
        for m in (mode, *{"greedy": ("sample", "top_p"), "sample": ("top_p", "greedy"),
                          "top_p": ("sample", "greedy")}[mode]):
            if m in self.step_per_seq_s:
                return self.step_per_seq_s[m]
        return 0.0

    def step_s(self, batch: Mapping[Mode, int], context: float) -> float:
        if sum(batch.values()) <= 0:
            return 0.0
        return (self.step_base_s + sum(self.per_seq(m) * n for m, n in batch.items())
                + self.step_per_context_s * context)

    def prefill_s(self, tokens: float, tokens_sq: float) -> float:
        return self.prefill_per_token_s * tokens + self.prefill_per_token_sq_s * tokens_sq
