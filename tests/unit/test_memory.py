"""The memory estimator against published numbers: parameter counts, weight bytes, KV cache, overheads."""

from __future__ import annotations

import pytest

from moa_local.config import EngineOptions, list_model_ids, load_model_config
from moa_local.config.model import Architecture
from moa_local.placement.memory import (
    CPU_BYTES_PER_VOCAB_ENTRY,
    CUDA_GRAPH_BYTES,
    DEFAULT_CPU_KVCACHE_GIB,
    GIB,
    NCCL_BYTES,
    count_params,
    estimate_cpu,
    estimate_gpu,
    kv_budget_bytes,
    kv_bytes_per_token,
    max_concurrency,
    valid_tensor_parallel_sizes,
    weight_bytes,
)

BIG_MODELS = [
    "qwen1.5-110b-chat",
    "qwen1.5-72b-chat",
    "wizardlm-2-8x22b",
    "llama-3-70b-instruct",
    "mixtral-8x22b-instruct",
    "dbrx-instruct",
    "llama-3.1-8b-instruct",
    "qwen2.5-7b-instruct",
    "mixtral-8x7b-instruct",
]
TINY_MODELS = ["smollm2-135m-instruct", "gemma3-270m"]

PUBLISHED_B = {
    "llama-3-70b-instruct": 70.6,
    "mixtral-8x22b-instruct": 140.6,
    "wizardlm-2-8x22b": 140.6,
    "qwen1.5-110b-chat": 111.0,
    "qwen1.5-72b-chat": 72.3,
    "dbrx-instruct": 132.0,
    "mixtral-8x7b-instruct": 46.7,
    "llama-3.1-8b-instruct": 8.03,
    "qwen2.5-7b-instruct": 7.62,
    "smollm2-135m-instruct": 0.1345,
    "gemma3-270m": 0.268,
}


def test_every_model_of_the_brief_is_shipped() -> None:
    assert set(BIG_MODELS + TINY_MODELS) <= set(list_model_ids())


@pytest.mark.parametrize("model_id", BIG_MODELS + TINY_MODELS)
def test_computed_parameters_within_two_percent_of_published(model_id: str) -> None:
    model = load_model_config(model_id)
    computed = count_params(model.architecture).total / 1e9
    assert model.architecture.params_b == pytest.approx(PUBLISHED_B[model_id], rel=1e-9)
    assert computed == pytest.approx(PUBLISHED_B[model_id], rel=0.02)


@pytest.mark.parametrize(
    ("model_id", "exact"),
    [
        ("llama-3.1-8b-instruct", 8_030_261_248),  # the safetensors total the Hub shows
        ("qwen2.5-7b-instruct", 7_615_616_512),
        ("smollm2-135m-instruct", 134_515_008),
    ],
)
def test_exact_counts_where_the_architecture_is_plain(model_id: str, exact: int) -> None:
    assert count_params(load_model_config(model_id).architecture).total == exact


def test_moe_counts_every_expert_and_the_router() -> None:
    arch = load_model_config("mixtral-8x7b-instruct").architecture
    params = count_params(arch)
    assert params.ffn == 32 * 8 * 3 * 4096 * 14336
    assert params.router == 32 * 4096 * 8
    dense = arch.model_copy(update={"num_experts": 0, "experts_per_token": 0})
    assert count_params(dense).ffn * 8 == params.ffn


def test_tied_embeddings_have_no_lm_head_and_bias_is_counted() -> None:
    tied = count_params(load_model_config("gemma3-270m").architecture)
    assert tied.lm_head == 0 and tied.embedding == 262144 * 640
    qwen = count_params(load_model_config("qwen2.5-7b-instruct").architecture)
    assert qwen.biases == 28 * (3584 + 2 * 512)


def test_weight_bytes_per_dtype_and_quantization() -> None:
    params = count_params(load_model_config("llama-3-70b-instruct").architecture)
    bf16 = weight_bytes(params, dtype="bfloat16")
    assert bf16 == 2 * params.total
    assert weight_bytes(params, dtype="float32") == 2 * bf16
    fp8 = weight_bytes(params, dtype="bfloat16", quantization="fp8")
    assert fp8 == params.quantizable + 2 * params.unquantized
    awq = weight_bytes(params, dtype="bfloat16", quantization="awq")
    group_overhead = params.quantizable / 128 * 2.5
    assert awq == pytest.approx(params.quantizable / 2 + group_overhead + 2 * params.unquantized, abs=1)
    assert weight_bytes(params, dtype="bfloat16", quantization="gptq") == awq
    assert 0.26 < awq / bf16 < 0.30  # 4-bit linear layers, 16-bit embeddings and lm_head


def test_kv_bytes_per_token_gqa_tp_and_fp8() -> None:
    arch = load_model_config("llama-3-70b-instruct").architecture
    assert kv_bytes_per_token(arch, kv_dtype_bytes=2) == 2 * 80 * 8 * 128 * 2
    assert kv_bytes_per_token(arch, kv_dtype_bytes=2, tensor_parallel_size=2) == 2 * 80 * 4 * 128 * 2
    # more ranks than KV heads: each rank keeps one (replicated) head
    assert kv_bytes_per_token(arch, kv_dtype_bytes=2, tensor_parallel_size=16) == 2 * 80 * 1 * 128 * 2
    assert kv_bytes_per_token(arch, kv_dtype_bytes=1) * 2 == kv_bytes_per_token(arch, kv_dtype_bytes=2)
    mha = load_model_config("qwen1.5-72b-chat").architecture
    assert kv_bytes_per_token(mha, kv_dtype_bytes=2) == 8 * kv_bytes_per_token(arch, kv_dtype_bytes=2)


def test_gpu_estimate_overheads_follow_options() -> None:
    model = load_model_config("llama-3-70b-instruct")
    one = estimate_gpu(model, EngineOptions(), tensor_parallel_size=1)
    two = estimate_gpu(model, EngineOptions(), tensor_parallel_size=2)
    eager = estimate_gpu(model, EngineOptions(enforce_eager=True), tensor_parallel_size=1)
    assert two.weights_per_gpu == pytest.approx(one.weights_per_gpu / 2, abs=1)
    assert two.context_bytes == one.context_bytes + NCCL_BYTES
    assert one.graph_bytes - eager.graph_bytes == CUDA_GRAPH_BYTES
    assert two.activation_bytes < one.activation_bytes
    assert one.dtype == "bfloat16"
    assert estimate_gpu(model, EngineOptions(dtype="float32"), tensor_parallel_size=1).weights_bytes == (
        2 * one.weights_bytes
    )


def test_kv_budget_under_utilization_and_concurrency() -> None:
    model = load_model_config("llama-3.1-8b-instruct")
    est = estimate_gpu(model, EngineOptions(), tensor_parallel_size=1)
    h100 = 81559 * 1024**2
    budget = kv_budget_bytes(est, gpu_memory_bytes=h100, utilization=0.9)
    # vLLM's budget (utilization x CUDA total) holds weights, activation peak and graphs; context and NCCL precede it
    assert budget == int(h100 * 0.9) - est.budget_fixed_per_gpu
    assert est.budget_fixed_per_gpu == est.fixed_per_gpu - est.context_bytes
    tokens = est.kv_tokens(int(h100 * 0.9))
    assert tokens == budget // (2 * 32 * 8 * 128 * 2)
    assert 400_000 < tokens < 500_000  # ~53 GiB of KV at 128 KiB per token
    assert max_concurrency(tokens, context_tokens=8192) == tokens // 8192
    assert kv_budget_bytes(est, gpu_memory_bytes=8 * GIB, utilization=0.9) == 0
    assert est.need_per_gpu(1000) == est.fixed_per_gpu + 1200 * est.kv_per_token_per_gpu  # KV_HEADROOM 1.2


def test_tensor_parallel_sizes_divide_heads_and_kv_heads() -> None:
    assert valid_tensor_parallel_sizes(load_model_config("smollm2-135m-instruct").architecture, limit=8) == [
        1
    ]
    assert valid_tensor_parallel_sizes(load_model_config("llama-3-70b-instruct").architecture, limit=16) == [
        1,
        2,
        4,
        8,
    ]
    assert valid_tensor_parallel_sizes(load_model_config("qwen2.5-7b-instruct").architecture, limit=8) == [
        1,
        2,
        4,
    ]
    assert valid_tensor_parallel_sizes(load_model_config("gemma3-270m").architecture, limit=8) == [1]


def test_cpu_estimate_matches_vllm_cpu_layout() -> None:
    model = load_model_config("smollm2-135m-instruct")
    est = estimate_cpu(model, EngineOptions())
    assert est.dtype == "float32"
    assert est.weights_bytes == 4 * count_params(model.architecture).total
    assert est.kv_bytes == int(DEFAULT_CPU_KVCACHE_GIB * GIB)
    # the packed lm_head copy (vocab x hidden at fp32) and the tokenizer state grow with the vocabulary
    assert est.packed_lm_head_bytes == 49152 * 576 * 4
    assert est.vocab_bytes == 49152 * CPU_BYTES_PER_VOCAB_ENTRY
    assert est.total_bytes == (est.weights_bytes + est.kv_bytes + est.process_bytes + est.activation_bytes
                               + est.packed_lm_head_bytes + est.vocab_bytes)
    half = estimate_cpu(model, EngineOptions(cpu_kvcache_gib=0.5, dtype="bfloat16"))
    assert half.kv_bytes == GIB // 2 and half.weights_bytes * 2 == est.weights_bytes
    assert est.kv_tokens == est.kv_bytes // (2 * 30 * 3 * 64 * 4)


def test_estimator_handles_a_synthetic_dense_architecture() -> None:
    arch = Architecture(
        params_b=1.0,
        num_layers=2,
        hidden_size=8,
        intermediate_size=16,
        num_attention_heads=2,
        num_kv_heads=1,
        head_dim=4,
        vocab_size=10,
        max_context=64,
    )
    p = count_params(arch)
    assert p.attention == 2 * (2 * 8 * 8 + 2 * 8 * 4)
    assert p.ffn == 2 * 3 * 8 * 16
    assert p.norms == 2 * 2 * 8 + 8
    assert p.embedding == p.lm_head == 80
