"""How vLLM 0.32 on CUDA spends a GPU, rank by rank: the simulated server's arithmetic, written from vLLM's code.

Owns the bytes of one engine rank from the weights folder's ``config.json`` (and its ``quantization_config``) and
the engine arguments: CUDA context and NCCL buffers (taken before vLLM's start-up snapshot, so outside its budget:
v1/worker/gpu_worker.py ``init_device``), weights (vocab-parallel embedding and lm_head, column/row-parallel
linear layers, replicated MoE router and norms; AWQ/GPTQ 4-bit with group scales and zeros, FP8 one byte), the
profiled activation peak (``profile_run`` over ``max_num_batched_tokens``, fused-MoE intermediate caches), the
sampler warm-up (``_dummy_sampler_run`` over ``max_num_seqs`` sequences, float32 logits plus the top-k/top-p sort),
the CUDA graph pool and the KV cache per token (blocks of 16). The defaults vLLM picks when an argument is absent
come from engine/arg_utils.py ``get_batch_defaults`` and config/cache.py.

Sizes that vLLM *measures* rather than computes (CUDA context, NCCL buffers, graph pool, activation peak) are
modelled here with stated constants; docs/placement.md says so. Never imports moa_local.placement.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

GIB = 1024**3
MIB = 1024**2

DEFAULT_GPU_MEMORY_UTILIZATION = 0.92
"""config/cache.py: ``gpu_memory_utilization: float = Field(default=0.92, ...)``."""

BLOCK_SIZE = 16
"""KV cache block size in tokens (the CUDA default)."""

CONTEXT_BYTES = 512 * MIB
"""Per rank: the CUDA context and cuBLAS workspaces, before vLLM's snapshot (modelled)."""

NCCL_BYTES = 768 * MIB
"""Per rank of a tensor-parallel engine: NCCL communicators and the custom all-reduce buffers, allocated by
``init_worker_distributed_environment`` before the snapshot (modelled)."""

GRAPH_POOL_BASE = 256 * MIB
"""CUDA graph pool besides the largest captured batch's activations (modelled)."""

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def batch_defaults(card_name: str, total_bytes: int) -> tuple[int, int]:
    """(max_num_batched_tokens, max_num_seqs) vLLM picks for the LLM class on this card (engine/arg_utils.py
    ``get_batch_defaults``: >= 160 GiB or >= 70 GiB and not an A100: 16384 / 1024; else 8192 / 256)."""
    if total_bytes >= 160 * GIB or (total_bytes >= 70 * GIB and "a100" not in card_name.lower()):
        return 16384, 1024
    return 8192, 256


@dataclass(frozen=True)
class Shape:
    """The numbers of a Hugging Face ``config.json`` this arithmetic needs."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    max_position: int
    experts: int
    topk: int
    tie: bool
    qkv_bias: bool
    torch_dtype: str
    quant: dict[str, Any] | None

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> Shape:
        heads = int(cfg["num_attention_heads"])
        return cls(
            layers=int(cfg["num_hidden_layers"]),
            hidden=int(cfg["hidden_size"]),
            intermediate=int(cfg["intermediate_size"]),
            heads=heads,
            kv_heads=int(cfg.get("num_key_value_heads", heads)),
            head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // heads),
            vocab=int(cfg["vocab_size"]),
            max_position=int(cfg["max_position_embeddings"]),
            experts=int(cfg.get("num_local_experts", 0)),
            topk=int(cfg.get("num_experts_per_tok", 0)),
            tie=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=bool(cfg.get("qkv_bias", False)),
            torch_dtype=str(cfg.get("torch_dtype", "bfloat16")),
            quant=cfg.get("quantization_config"),
        )


@dataclass(frozen=True)
class RankBytes:
    """What one rank of an engine maps on its GPU."""

    context: int
    weights: int
    weights_load_peak: int
    """Extra bytes while loading (online FP8: one layer's full-precision weights at a time, reload/layerwise.py)."""
    activation_peak: int
    graphs: int
    kv_per_token: int


def _quant_method(shape: Shape, quantization: str | None) -> tuple[str | None, bool]:
    """(method, pre-quantized checkpoint). vLLM's rules (config/model.py ``_verify_quantization``,
    model_loader/weight_utils.py ``get_quant_config``) are checked in engine.py; here only the bytes."""
    if shape.quant is not None:
        return str(shape.quant.get("quant_method", "")).lower() or None, True
    return quantization, False


def rank_bytes(shape: Shape, *, dtype: str, quantization: str | None, tp: int, kv_cache_dtype: str,
               max_num_batched_tokens: int, max_num_seqs: int, enforce_eager: bool) -> RankBytes:
    """The bytes of one rank of an engine with these arguments."""
    act = DTYPE_BYTES[dtype]
    h, L, d = shape.hidden, shape.layers, shape.head_dim
    q_out, kv_out = shape.heads * d, shape.kv_heads * d
    experts = max(1, shape.experts)
    linear = L * (h * (q_out + 2 * kv_out) + q_out * h + experts * 3 * h * shape.intermediate)
    other = L * (2 * h + (q_out + 2 * kv_out if shape.qkv_bias else 0) + h * shape.experts) + h
    vocab = shape.vocab * h * (1 if shape.tie else 2)
    method, prequantized = _quant_method(shape, quantization)
    if method in ("awq", "gptq"):
        group = int((shape.quant or {}).get("group_size", 128))
        linear_bytes = linear * 0.5 + linear / group * (2 + 0.5)  # 4-bit qweight, fp16 scales, packed qzeros
    elif method == "fp8":
        linear_bytes = linear * 1.0 + L * (q_out + 2 * kv_out + h + experts * 3 * shape.intermediate) * 4
    else:
        linear_bytes = linear * act
    weights = int(linear_bytes / tp + vocab * act / tp + other * act)
    load_peak = 0
    if method == "fp8" and not prequantized:  # online: full-precision weights land one layer at a time
        load_peak = int(linear / L * act / tp)
    # profile_run: residual, hidden and normed states, fused qkv, attention output, MLP (fused-MoE caches: topk x
    # (gate_up, activated, down outputs); router logits in float32)
    mlp = (2 + 1) * shape.intermediate // tp
    per_token = 3 * h + (q_out + 2 * kv_out) // tp + q_out // tp
    per_token += (shape.topk * (mlp + h) + shape.experts * 2) if shape.experts else mlp
    tokens = max_num_batched_tokens
    hidden_peak = tokens * per_token * act
    sampler = min(max_num_seqs, tokens) * shape.vocab * (4 + 4 + 4 + 8)  # float32 logits, probs, sorted + indices
    peak = max(hidden_peak, sampler)
    capture = min(2 * max_num_seqs, 512)
    graphs = 0 if enforce_eager else GRAPH_POOL_BASE + capture * per_token * act
    kv_heads = max(1, shape.kv_heads // tp)
    kv_bytes = 1 if kv_cache_dtype.startswith("fp8") else act
    return RankBytes(
        context=CONTEXT_BYTES + (NCCL_BYTES if tp > 1 else 0),
        weights=weights,
        weights_load_peak=load_peak,
        activation_peak=peak,
        graphs=graphs,
        kv_per_token=2 * L * kv_heads * d * kv_bytes,
    )


def kv_bytes_for(max_model_len: int, kv_per_token: int) -> int:
    """KV bytes one sequence of ``max_model_len`` needs, in whole blocks (kv_cache_utils ``max_memory_usage_bytes``)."""
    return math.ceil(max_model_len / BLOCK_SIZE) * BLOCK_SIZE * kv_per_token
