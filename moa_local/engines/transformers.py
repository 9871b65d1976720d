"""The transformers backend: one model in this process, batched ``generate`` with left padding, CPU or CUDA.

The fallback where vLLM is absent, and the backend checked on a lent GPU. Renders chat messages with the model's
prompt format; knows nothing about layers or references. torch/transformers are imported when an engine starts.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

from moa_local.config.model import ModelConfig
from moa_local.config.recipe import EngineOptions, Sampling
from moa_local.engines.base import BatchingEngine, Generation, MemoryReport, Overflow, Request, Usage
from moa_local.errors import EngineStartError
from moa_local.models.prepare import require_prepared
from moa_local.prompts import RenderedPrompt, render_prompt

_TORCH_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """Cut ``text`` at the first stop string; says whether one was found."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


class TransformersEngine(BatchingEngine):
    """One model in this process; requests queue for one dispatcher thread that runs them as batches."""

    def __init__(self, config: ModelConfig, *, options: EngineOptions) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model_id = config.id
        self.config = config
        self.options = options
        path = require_prepared(config)
        device = options.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype_name = options.dtype if options.dtype != "auto" else (config.cpu_dtype if device == "cpu" else config.dtype)
        self.device = device
        self.max_model_len = options.max_model_len or config.architecture.max_context
        self._torch = torch
        self._lock = threading.Lock()
        self.tokenizer: Any = None
        self.model: Any = None
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.tokenizer.padding_side = "left"
            if self.tokenizer.pad_token_id is None:
                self.tokenizer.pad_token = self.tokenizer.eos_token
            self.model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, _TORCH_DTYPES[dtype_name]))
            self.model.to(device).eval()
        except Exception as exc:  # any load failure becomes one clear error
            raise EngineStartError(f"transformers could not load '{config.id}' from {path}: {exc}") from exc
        self._weights_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        self._start_dispatcher()

    def render(self, request: Request) -> RenderedPrompt:
        return render_prompt(request.messages, prompt_format=self.config.prompt_format, tokenizer=self.tokenizer,
                             system_prompt=self.config.system_prompt)

    def _encode(self, rendered: RenderedPrompt) -> list[int]:
        ids: list[int] = self.tokenizer(rendered.text, add_special_tokens=rendered.add_special_tokens)["input_ids"]
        return ids

    def _generate_kwargs(self, sampling: Sampling, stop: Sequence[str]) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"max_new_tokens": sampling.max_tokens, "pad_token_id": self.tokenizer.pad_token_id}
        if sampling.temperature > 0:
            kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if stop:
            kwargs.update(stop_strings=list(stop), tokenizer=self.tokenizer)
        return kwargs

    def run_batch(self, requests: Sequence[Request]) -> list[Generation]:
        out: list[Generation | None] = [None] * len(requests)
        groups: dict[tuple[Any, ...], list[tuple[int, list[int], tuple[str, ...]]]] = {}
        for i, req in enumerate(requests):
            rendered = self.render(req)
            ids = self._encode(rendered)
            if len(ids) + req.sampling.max_tokens > self.max_model_len:
                out[i] = Generation.too_long(Overflow(len(ids), req.sampling.max_tokens, self.max_model_len),
                                             model_id=self.model_id)
                continue
            stop = tuple(rendered.stop) + tuple(req.sampling.stop)
            groups.setdefault((req.sampling.model_dump_json(), stop), []).append((i, ids, stop))
        with self._lock:
            for members in groups.values():
                sampling = requests[members[0][0]].sampling
                for i, gen in zip([m[0] for m in members], self._run_group(sampling, members), strict=True):
                    out[i] = gen
        return [g if g is not None else Generation.failed("internal: no result") for g in out]

    def _run_group(self, sampling: Sampling, members: list[tuple[int, list[int], tuple[str, ...]]]) -> list[Generation]:
        torch = self._torch
        start = time.perf_counter()
        stop = members[0][2]
        padded = self.tokenizer.pad({"input_ids": [m[1] for m in members]}, return_tensors="pt", padding=True)
        batch = {k: v.to(self.device) for k, v in padded.items()}
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        with torch.inference_mode():
            output = self.model.generate(**batch, **self._generate_kwargs(sampling, stop))
        seconds = time.perf_counter() - start
        width = batch["input_ids"].shape[1]
        results = []
        eos = {self.tokenizer.eos_token_id, self.tokenizer.pad_token_id}
        for (_, ids, _), row in zip(members, output, strict=True):
            new = [t for t in row[width:].tolist()]
            while new and new[-1] in eos:
                new.pop()
            text: str = self.tokenizer.decode(new, skip_special_tokens=True)
            text, stopped = cut_at_stop(text, stop)
            finish = "stop" if stopped or len(new) < sampling.max_tokens else "length"
            results.append(Generation(text=text.strip(), usage=Usage(len(ids), len(new)), seconds=seconds, finish_reason=finish))
        return results

    def run_stream(self, request: Request) -> Iterator[str]:
        from transformers import TextIteratorStreamer

        rendered = self.render(request)
        ids = self._encode(rendered)
        stop = tuple(rendered.stop) + tuple(request.sampling.stop)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        inputs = {"input_ids": self._torch.tensor([ids], device=self.device)}
        inputs["attention_mask"] = self._torch.ones_like(inputs["input_ids"])
        kwargs = {**inputs, **self._generate_kwargs(request.sampling, stop), "streamer": streamer}

        def run() -> None:
            with self._lock, self._torch.inference_mode():
                self.model.generate(**kwargs)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        text = ""
        emitted = 0
        for delta in streamer:
            text += delta
            cut, stopped = cut_at_stop(text, stop)
            safe = cut if stopped else text[: max(emitted, len(text) - max((len(s) for s in stop), default=0))]
            if len(safe) > emitted:
                yield safe[emitted:]
                emitted = len(safe)
            if stopped:
                break
        thread.join()
        final, _ = cut_at_stop(text, stop)
        if len(final) > emitted:
            yield final[emitted:]

    def memory(self) -> MemoryReport:
        peak = 0
        if self.device == "cuda":
            peak = int(self._torch.cuda.max_memory_allocated())
        return MemoryReport(weights_bytes=self._weights_bytes, peak_bytes=peak, device=self.device)

    def close(self) -> None:
        if getattr(self, "model", None) is None:
            return
        self._stop_dispatcher()
        self.model = None
        if self.device == "cuda":
            self._torch.cuda.empty_cache()
