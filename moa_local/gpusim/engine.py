"""The stand-in for ``vllm.LLM`` on the simulated GPU server: vLLM 0.32's CUDA rules, no weights, no GPU.

Owns what moa-local's VLLMHost calls (``LLM(model=, tokenizer=, **engine_args)``, ``llm.llm_engine`` with
``add_request`` / ``step`` / ``abort_request`` / ``has_unfinished_requests`` / ``model_config.max_model_len`` /
``renderer.render_cmpl`` / ``engine_core.shutdown``, ``llm.sleep``, ``llm.wake_up(tags=)``, ``llm.collective_rpc``)
and enforces, in the order vLLM does them:
  1. the engine arguments (unknown ones are a TypeError, as ``EngineArgs(**kwargs)`` raises);
  2. dtype and quantization rules (config/model.py ``_verify_quantization``, config/vllm.py: float32 is not an
     activation dtype of AWQ/GPTQ/FP8; a checkpoint's quantization_config must match ``quantization``; ``awq``/
     ``gptq`` need a quantized checkpoint, ``fp8`` on a full-precision one is online quantization);
  3. which GPUs the ranks see: CUDA_VISIBLE_DEVICES ("" is none); ``tensor_parallel_size`` larger than the visible
     GPUs fails without the Ray executor (config/parallel.py); the Ray executor takes the GPUs of the placement
     group's bundles (v1/executor/ray_utils.py);
  4. per rank: context and NCCL mapped, then the start-up free-memory check (v1/worker/utils.py
     ``request_memory``: free >= ceil(total x gpu_memory_utilization), whatever kv_cache_memory_bytes says),
     weights, the profiling peak, KV = requested - non-KV - CUDA graphs (gpu_worker.py
     ``determine_available_memory``), the max_model_len check (v1/core/kv_cache_utils.py), KV and graphs mapped;
  5. sleep levels (device_allocator/sleep_mode_backend.py, cumem.py): level 1 keeps the weights in CPU RAM, level 2
     discards them, so after ``wake_up()`` alone the model answers garbage until ``collective_rpc("reload_weights")``;
     KV is always discarded; context, NCCL and the graph pool stay mapped.
Answers are deterministic words derived from the prompt's token ids (greedy: the same prompt, the same answer),
ended by the model's end-of-turn token and followed by junk that only a correct stop set cuts off.
"""

from __future__ import annotations

import enum
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moa_local.gpusim.accounting import (
    DEFAULT_GPU_MEMORY_UTILIZATION,
    GIB,
    RankBytes,
    Shape,
    batch_defaults,
    kv_bytes_for,
    rank_bytes,
)
from moa_local.gpusim.box import Box

ENGINE_ARGS = {
    "dtype", "tensor_parallel_size", "enforce_eager", "seed", "max_model_len", "quantization", "kv_cache_dtype",
    "kv_cache_memory_bytes", "gpu_memory_utilization", "enable_sleep_mode", "max_num_batched_tokens",
    "max_num_seqs", "distributed_executor_backend", "enable_chunked_prefill",
}
"""Engine arguments this stand-in understands (all are vLLM 0.32 ``EngineArgs`` fields)."""

QUANT_DTYPES = {"awq": ("float16", "bfloat16"), "gptq": ("float16", "bfloat16"), "fp8": ("bfloat16", "float16")}
"""Activation dtypes per method: auto_awq.py / auto_gptq.py / fp8.py ``get_supported_act_dtypes``."""

WORDS = ("light", "scatter", "blue", "air", "sun", "wave", "short", "long", "sky", "red", "atoms", "eye")
GARBAGE = ("##", "@@", "qz", "xv", "%%", "~~")


class RequestOutputKind(enum.Enum):
    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int | None = 16
    seed: int | None = None
    stop: list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE


@dataclass
class CompletionOutput:
    text: str
    token_ids: list[int]
    finish_reason: str | None = None


@dataclass
class RequestOutput:
    request_id: str
    outputs: list[CompletionOutput]
    finished: bool


class _Platform:
    device_type = "cuda"

    def is_cpu(self) -> bool:
        return False

    def is_cuda(self) -> bool:
        return True


current_platform = _Platform()


def parse_model_prompt(model_config: Any, prompt: dict[str, Any]) -> dict[str, Any]:
    """renderers/inputs/preprocess.py: a token prompt stays a token prompt."""
    return dict(prompt)


@dataclass
class _ModelConfig:
    max_model_len: int


class _Renderer:
    def render_cmpl(self, prompts: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{"type": "token", "prompt_token_ids": list(p["prompt_token_ids"])} for p in prompts]


@dataclass
class _Request:
    rid: str
    prompt: list[int]
    params: SamplingParams
    answer: list[int]
    sent: int = 0
    text_sent: str = ""
    finish: str | None = None
    done: list[int] = field(default_factory=list)


def _visible(box: Box) -> list[int]:
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is None:
        return [c.index for c in box.cards]
    return [int(x) for x in env.split(",") if x.strip()]


def _ray_gpus(tp: int) -> list[int]:
    """v1/executor/ray_utils.py: one worker per GPU bundle of the current placement group
    (VLLM_RAY_BUNDLE_INDICES picks them); each reports the GPU Ray gave it."""
    import ray
    from ray.util.placement_group import get_current_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    group = get_current_placement_group()
    if group is None:
        raise ValueError("distributed_executor_backend='ray' outside a placement group: no GPUs for the workers")
    wanted = os.environ.get("VLLM_RAY_BUNDLE_INDICES")
    bundles = [int(b) for b in wanted.split(",")] if wanted else list(range(tp))
    share = float(os.environ.get("VLLM_RAY_PER_WORKER_GPUS", "1"))
    if len(bundles) < tp:
        raise ValueError(f"The number of required GPUs exceeds the total number of available GPUs in the placement "
                         f"group. Required number of devices: {tp}. Total number of devices: {len(bundles)}.")

    @ray.remote(num_cpus=0, num_gpus=share)
    def gpu_of_worker() -> int:
        return int(ray.get_runtime_context().get_accelerator_ids()["GPU"][0])

    refs = [gpu_of_worker.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
        placement_group=group, placement_group_bundle_index=b)).remote() for b in bundles[:tp]]
    return [int(g) for g in ray.get(refs)]


class LLMEngine:
    """``llm.llm_engine``: requests in, outputs out, one step at a time."""

    def __init__(self, llm: LLM) -> None:
        self._llm = llm
        self.model_config = _ModelConfig(llm.max_model_len)
        self.renderer = _Renderer()
        self.engine_core = self
        self._requests: dict[str, _Request] = {}

    def add_request(self, request_id: str, prompt: dict[str, Any], params: SamplingParams) -> None:
        llm = self._llm
        ids = list(prompt["prompt_token_ids"])
        if len(ids) >= llm.max_model_len:
            raise ValueError(f"The decoder prompt (length {len(ids)}) is longer than the maximum model length of "
                             f"{llm.max_model_len}.")
        self._requests[request_id] = _Request(request_id, ids, params, llm.answer(ids, params))
        llm.box.event("request", engine=llm.name, rid=request_id, prompt_tokens=len(ids))

    def abort_request(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self._requests.pop(rid, None)

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    def step(self) -> list[RequestOutput]:
        llm = self._llm
        if llm.asleep:
            raise RuntimeError(f"engine '{llm.name}' is asleep ({sorted(llm.asleep)}); call wake_up() first")
        out = []
        for req in list(self._requests.values()):
            params = req.params
            stops = set(params.stop_token_ids or []) | ({llm.eos_id} if not params.ignore_eos else set())
            if not params.ignore_eos:
                stops |= llm.generation_eos
            budget = params.max_tokens or 16
            for tok in req.answer[len(req.done):len(req.done) + 8]:
                req.done.append(tok)
                if tok in stops:
                    req.finish = "stop"
                    break
                if len(req.done) >= budget:
                    req.finish = "length"
                    break
            if req.finish is None and len(req.done) >= len(req.answer):
                req.finish = "length"
            finished = req.finish is not None
            shown = [t for t in req.done if t not in stops] if finished and req.finish == "stop" else list(req.done)
            text = llm.decode(shown)
            if params.output_kind == RequestOutputKind.DELTA:
                delta_ids, req.sent = req.done[req.sent:], len(req.done)
                delta_text, req.text_sent = text[len(req.text_sent):], text
                out.append(RequestOutput(req.rid, [CompletionOutput(delta_text, delta_ids, req.finish)], finished))
            elif finished:
                out.append(RequestOutput(req.rid, [CompletionOutput(text, list(req.done), req.finish)], True))
            if finished:
                del self._requests[req.rid]
        return out

    def shutdown(self) -> None:
        self._llm.close()


class LLM:
    """vllm.LLM on the simulated box (``$MOA_LOCAL_GPU_SIM``)."""

    def __init__(self, model: str, tokenizer: str | None = None, **kwargs: Any) -> None:
        unknown = sorted(set(kwargs) - ENGINE_ARGS)
        if unknown:
            raise TypeError(f"EngineArgs.__init__() got an unexpected keyword argument '{unknown[0]}'")
        self.box = Box.from_env()
        self.path = Path(model)
        self.name = self.path.name
        cfg = json.loads((self.path / "config.json").read_text())
        shape = Shape.from_config(cfg)
        gen = self.path / "generation_config.json"
        gen_eos = json.loads(gen.read_text()).get("eos_token_id") if gen.is_file() else None
        self.generation_eos = set(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
        self.eos_id = int(cfg.get("eos_token_id", 0))
        self.sim = json.loads((self.path / "sim.json").read_text())
        self._load_tokenizer(tokenizer or model)

        # 1-2. dtype and quantization (config/model.py, config/vllm.py)
        dtype = kwargs.get("dtype", "auto")
        dtype = shape.torch_dtype if dtype == "auto" else dtype
        quant = kwargs.get("quantization")
        ckpt = str(shape.quant["quant_method"]).lower() if shape.quant else None
        if ckpt and quant and ckpt != quant:
            raise ValueError(f"Quantization method specified in the model config ({ckpt}) does not match the "
                             f"quantization method specified in the `quantization` argument ({quant}).")
        method = ckpt or quant
        if method in ("awq", "gptq") and ckpt is None:
            raise ValueError(f"Cannot find the config file for {method}")
        if method and dtype not in QUANT_DTYPES.get(method, (dtype,)):
            raise ValueError(f"torch.{dtype} is not supported for quantization method {method}. Supported dtypes: "
                             f"{[f'torch.{d}' for d in QUANT_DTYPES[method]]}")
        if dtype == "bfloat16" and "RTX" not in self.box.cards[0].name and "A100" not in self.box.cards[0].name:
            pass  # compute capability >= 8.0 on every simulated card: bfloat16 is allowed

        # 3. GPUs (config/parallel.py, platforms/interface.py, v1/executor/ray_utils.py)
        tp = int(kwargs.get("tensor_parallel_size", 1))
        backend = kwargs.get("distributed_executor_backend")
        visible = _visible(self.box)
        if backend == "ray" and tp > 1:
            self.gpus = _ray_gpus(tp)
        else:
            if tp > len(visible):
                raise ValueError(
                    f"World size ({tp}) is larger than the number of available GPUs ({len(visible)}) in this node. If "
                    "this is intentional and you are using:\n- ray, set '--distributed-executor-backend ray'.\n- "
                    "multiprocessing, set '--nnodes' appropriately."
                )
            self.gpus = visible[:tp]
        card = self.box.cards[self.gpus[0]]
        tokens_default, seqs_default = batch_defaults(card.name, card.total)
        max_len = int(kwargs.get("max_model_len") or shape.max_position)
        if max_len > shape.max_position:
            raise ValueError(f"User-specified max_model_len ({max_len}) is greater than the derived max_model_len "
                             f"(max_position_embeddings={shape.max_position} in model's config.json).")
        self.max_model_len = max_len
        self.rank: RankBytes = rank_bytes(
            shape, dtype=dtype, quantization=quant, tp=tp, kv_cache_dtype=str(kwargs.get("kv_cache_dtype", "auto")),
            max_num_batched_tokens=int(kwargs.get("max_num_batched_tokens") or tokens_default),
            max_num_seqs=int(kwargs.get("max_num_seqs") or seqs_default),
            enforce_eager=bool(kwargs.get("enforce_eager", False)),
        )
        self.sleep_mode = bool(kwargs.get("enable_sleep_mode", False))
        util = float(kwargs.get("gpu_memory_utilization") or DEFAULT_GPU_MEMORY_UTILIZATION)
        kv_fixed = kwargs.get("kv_cache_memory_bytes")

        # 4. per rank: context, the free-memory check, weights, profile, KV (gpu_worker.py, utils.py)
        self.box.event("starting", engine=self.name, gpus=self.gpus, kwargs=kwargs, pid=os.getpid(),
                       visible=os.environ.get("CUDA_VISIBLE_DEVICES"))
        try:
            kv = self._start_ranks(util=util, kv_fixed=kv_fixed)
        except BaseException:
            self.box.free(engine=self.name)
            raise
        self.kv_bytes = kv
        self.asleep: set[str] = set()
        self.level = 0
        self.garbage = False
        self.llm_engine = LLMEngine(self)
        self.box.event("start", engine=self.name, gpus=self.gpus, tp=tp, util=util, kv_bytes=kv,
                       max_model_len=max_len, kwargs=kwargs)

    def _start_ranks(self, *, util: float, kv_fixed: int | None) -> int:
        r, box, name = self.rank, self.box, self.name
        available = []
        for gpu in self.gpus:
            box.alloc(gpu, r.context, tag="context", engine=name)
            total = box.cards[gpu].total
            free = box.free_memory(gpu)
            requested = math.ceil(total * util)
            if free < requested:
                raise ValueError(
                    f"Free memory on device cuda:{gpu} ({free / GIB:.2f}/{total / GIB:.2f} GiB) on startup is less "
                    f"than desired GPU memory utilization ({util}, {requested / GIB:.2f} GiB). Decrease GPU memory "
                    "utilization or reduce GPU memory used by other processes."
                )
            box.alloc(gpu, r.weights, tag="weights", engine=name)
            if r.weights_load_peak:
                box.alloc(gpu, r.weights_load_peak, tag="load", engine=name)
                box.free(engine=name, tags=("load",))
            box.alloc(gpu, r.activation_peak, tag="profile", engine=name)
            box.free(engine=name, tags=("profile",))
            if kv_fixed:
                available.append(int(kv_fixed))
            else:
                available.append(requested - r.weights - r.activation_peak - r.graphs)
        kv = min(available)
        if kv <= 0:
            raise ValueError("No available memory for the cache blocks. Try increasing `gpu_memory_utilization` when "
                             "initializing the engine.")
        needed = kv_bytes_for(self.max_model_len, r.kv_per_token)
        if needed > kv:
            longest = kv // r.kv_per_token // 16 * 16
            raise ValueError(
                f"To serve at least one request with the model's max seq len ({self.max_model_len}), "
                f"({needed / GIB:.2f} GiB KV cache is needed, which is larger than the available KV cache memory "
                f"({kv / GIB:.2f} GiB). Based on the available memory, the estimated maximum model length is "
                f"{longest}. Try increasing `gpu_memory_utilization` or decreasing `max_model_len` when "
                "initializing the engine."
            )
        for gpu in self.gpus:
            self.box.alloc(gpu, kv, tag="kv_cache", engine=name)
            if r.graphs:
                self.box.alloc(gpu, r.graphs, tag="cudagraph", engine=name)
        return kv

    # -- tokens ----------------------------------------------------------------------------------------------

    def _load_tokenizer(self, path: str) -> None:
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(Path(path) / "tokenizer.json"))
        self.eot_id = int(self.sim["end_of_turn_id"])

    def decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def answer(self, prompt: list[int], params: SamplingParams) -> list[int]:
        """The model's whole answer to ``prompt``: words picked by a hash of the prompt (and the seed when sampling),
        its end-of-turn token, then what a model says after a turn it was not stopped at."""
        salt = "" if params.temperature == 0 else f"{params.seed}:{params.temperature}"
        digest = hashlib.sha256(f"{self.name}|{salt}|{prompt}".encode()).digest()
        vocab = GARBAGE if self.garbage else WORDS
        words = " ".join(vocab[b % len(vocab)] for b in digest[:12])
        text = f" {self.sim['label']} says: {words}."
        body = self.tokenizer.encode(text, add_special_tokens=False).ids
        junk = self.tokenizer.encode(" assistant\n\nAND MORE TEXT AFTER THE TURN", add_special_tokens=False).ids
        return [*body, self.eot_id, *junk]

    # -- sleep (v1/worker/gpu_worker.py sleep / wake_up, device_allocator) -------------------------------------

    def sleep(self, level: int = 1) -> None:
        if not self.sleep_mode:
            raise ValueError("Sleep mode is not enabled. Please compile vLLM with enable_sleep_mode=True.")
        self.box.free(engine=self.name, tags=("weights", "kv_cache"))
        self.asleep = {"weights", "kv_cache"}
        self.level = level
        if level >= 2:
            self.garbage = True  # discarded, not offloaded: nothing to copy back
        self.box.event("sleep", engine=self.name, level=level, gpus=self.gpus)

    def wake_up(self, tags: list[str] | None = None) -> bool:
        for tag in tags or sorted(self.asleep):
            if tag not in self.asleep:
                continue
            nbytes = self.rank.weights if tag == "weights" else self.kv_bytes
            for gpu in self.gpus:
                self.box.alloc(gpu, nbytes, tag=tag, engine=self.name)
            self.asleep.discard(tag)
        self.box.event("wake", engine=self.name, tags=tags, garbage=self.garbage, gpus=self.gpus)
        return not self.asleep

    def collective_rpc(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        if method == "reload_weights":
            if "weights" in self.asleep:
                raise RuntimeError("reload_weights while the weights are asleep: wake_up(tags=['weights']) first")
            self.garbage = False
            self.box.event("reload_weights", engine=self.name)
            return [None] * len(self.gpus)
        raise AttributeError(f"the simulated worker has no method '{method}'")

    def close(self) -> None:
        self.box.free(engine=self.name)
        self.box.event("stop", engine=self.name)
