"""Gathering concurrent requests into shared batches: the server's request queue and its one worker thread.

Requests that arrive within a short window (``window_s``, 20 ms by default) run together. MoA requests with the
same sampling overrides become one ``pipeline.run``, so each layer is one batch per model for all of them; requests
to a single model become one ``runner.run``. While a batch runs, new requests queue up and form the next batch, so
under load each batch is as large as the traffic (up to ``max_batch``) and ten users cost close to one batch.
Streamed MoA requests share the layers' batches too; only their final answers are streamed, each as it is written.
With ``aggregation: chunked`` every layer of a streamed request streams, so those run one conversation each, at the
same time, and the engines batch them as they can.

Events go to each job's ``sink``, from worker threads: ``str`` deltas (streamed jobs), then one ``Answer`` or one
``MoaError`` (InputError/PromptTooLongError, ServerBusy, EngineDiedError, EngineError, ConversationFailed).
Owns: the queue and its limit, the worker, grouping, the context-length check at the door, per-request sampling.
Never touches HTTP, nor engines other than through the MoA's LayerRunner.
"""

from __future__ import annotations

import re
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import lru_cache, partial
from typing import Any

from moa_local.api import MoA
from moa_local.config.recipe import Recipe, Role, Sampling
from moa_local.config.registry import load_model_config
from moa_local.engines.base import Generation, Request, Usage
from moa_local.errors import (
    ConversationFailed,
    EngineDiedError,
    EngineError,
    InputError,
    MoaError,
    PromptTooLongError,
    ServerBusy,
)
from moa_local.pipeline import Conversation, LayerRunner, MoAPipeline, Result
from moa_local.pipeline.chunked import ChunkedAggregation
from moa_local.prompts import Message

_CONTEXT_ERROR = re.compile(r"max_model_len|context length|context window|maximum context", re.IGNORECASE)


@dataclass(frozen=True)
class Overrides:
    """Per-request sampling. MoA: temperature, top_p and seed apply to every role; max_tokens and stop to the
    aggregator (they shape the answer the client receives). One model: all of them apply to it."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] | None = None


@dataclass
class Answer:
    """A finished answer: the text, why it ended, token counts (every role's), and the trace when asked for."""

    text: str
    finish_reason: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    hidden_tokens: int = 0  # MoA: what the proposers wrote
    trace: dict[str, Any] | None = None


Event = str | Answer | MoaError
Sink = Callable[[Event], None]


@dataclass(eq=False)
class Job:
    """One request: to the recipe (``target`` = recipe name) or to one model (``target`` = its id)."""

    target: str
    messages: list[Message]
    sink: Sink
    overrides: Overrides = field(default_factory=Overrides)
    stream: bool = False
    want_trace: bool = False
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    arrived: float = field(default_factory=time.perf_counter)
    cancelled: threading.Event = field(default_factory=threading.Event)
    done: bool = False

    def emit(self, delta: str) -> None:
        if not self.done:
            self.sink(delta)

    def finish(self, item: Answer | MoaError) -> None:
        if not self.done:
            self.done = True
            self.sink(item)


class Gatherer:
    """The queue and worker in front of a loaded MoA. Thread-safe; ``submit`` never blocks."""

    def __init__(self, moa: MoA, *, window_s: float = 0.02, max_batch: int = 32, max_queue: int = 256) -> None:
        self.moa = moa
        self.recipe = moa.recipe
        self.runner: LayerRunner = moa.runner
        self.window_s = window_s
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.batches = 0  # batches run so far
        self._queue: deque[Job] = deque()
        self._running = 0
        self._closed = False
        self._cond = threading.Condition()
        self._worker = threading.Thread(target=self._loop, name="moa-gatherer", daemon=True)
        self._worker.start()

    # -- the door -------------------------------------------------------------------------------------------------

    @property
    def models(self) -> list[str]:
        return self.recipe.model_ids()

    def depth(self) -> tuple[int, int]:
        """(queued, running) requests."""
        with self._cond:
            return len(self._queue), self._running

    def health(self) -> dict[str, bool]:
        health = getattr(self.runner, "health", None)
        return dict(health()) if callable(health) else {m: True for m in self.models}

    def submit(self, job: Job) -> None:
        """Queue a job. Raises InputError (unknown target), PromptTooLongError (never fits), ServerBusy (queue
        full), EngineDiedError (closed)."""
        if job.target != self.recipe.name and job.target not in self.models:
            raise InputError(f"unknown model '{job.target}'; serving {', '.join([self.recipe.name, *self.models])}")
        self.check_context(job)
        with self._cond:
            if self._closed:
                raise EngineDiedError("the server is shutting down")
            if len(self._queue) + self._running >= self.max_queue:
                raise ServerBusy(f"the request queue is full ({self.max_queue} requests queued or running); retry later")
            self._queue.append(job)
            self._cond.notify_all()

    def check_context(self, job: Job) -> None:
        """Reject a prompt that cannot fit: its word count (a lower bound on tokens) plus the answer's max_tokens
        exceeds a model's context. Prompts that slip past fail in the engine and are reported the same way."""
        words = sum(len(m["content"].split()) for m in job.messages)
        for role in self._roles(job):
            need = words + len((role.system_prompt or "").split()) + role.sampling.max_tokens
            limit = _context_of(self.recipe, role.model)
            if need > limit:
                raise PromptTooLongError(
                    f"the conversation holds at least {words} tokens and '{role.name or role.model}' may answer with "
                    f"{role.sampling.max_tokens}: more than the {limit}-token context of '{role.model}'. "
                    "Shorten the conversation or lower max_tokens."
                )

    def close(self, timeout: float = 30.0) -> None:
        """Stop taking jobs; let the running batch end; fail what is still queued."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._worker.join(timeout)

    # -- the worker -----------------------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if self._closed:
                    leftover = list(self._queue)
                    self._queue.clear()
                    break
                deadline = self._queue[0].arrived + self.window_s
                while not self._closed and len(self._queue) < self.max_batch and (left := deadline - time.perf_counter()) > 0:
                    self._cond.wait(left)
                batch = [self._queue.popleft() for _ in range(min(self.max_batch, len(self._queue)))]
                self._running = len(batch)
            try:
                self._run_batch(batch)
            except Exception as exc:  # one bad batch must not stop the server; its jobs get the error
                for job in batch:
                    job.finish(EngineError(f"internal error while running the batch: {exc!r}"))
            finally:
                with self._cond:
                    self._running = 0
                    self.batches += 1
        for job in leftover:
            job.finish(EngineDiedError("the server is shutting down"))

    def _run_batch(self, batch: list[Job]) -> None:
        jobs = [j for j in batch if not j.cancelled.is_set()]
        dead = {m for m, ok in self.health().items() if not ok}
        tasks: list[Callable[[], None]] = []
        singles: list[Job] = []
        groups: dict[tuple[Overrides, bool], list[Job]] = {}
        for job in jobs:
            down = sorted(dead & set(self._models_of(job)))
            if down:
                job.finish(EngineDiedError(f"the engine for {', '.join(down)} is down; restart the server"))
            elif job.target != self.recipe.name:
                if job.stream:
                    tasks.append(partial(self._stream_single, job))
                else:
                    singles.append(job)
            elif job.stream and self.recipe.aggregation == "chunked":
                tasks.append(partial(self._stream_chunked, job))
            else:
                groups.setdefault((job.overrides, job.stream), []).append(job)
        if singles:
            tasks.append(partial(self._run_singles, singles))
        for (overrides, stream), members in groups.items():
            tasks.append(partial(self._run_moa, members, overrides, stream=stream))
        if len(tasks) == 1:
            tasks[0]()
        elif tasks:
            with ThreadPoolExecutor(max_workers=len(tasks), thread_name_prefix="moa-batch") as pool:
                for future in [pool.submit(t) for t in tasks]:
                    future.result()

    # -- MoA jobs -------------------------------------------------------------------------------------------------

    def _run_moa(self, jobs: list[Job], overrides: Overrides, *, stream: bool) -> None:
        recipe = self.recipe_for(overrides)
        runner: LayerRunner = self.runner
        progress = None
        if stream:
            streams = _AggregatorStreams(self.runner, {j.id: j for j in jobs})
            runner, progress = streams, streams.progress
        try:
            results = MoAPipeline(recipe, runner).run([Conversation(j.id, j.messages) for j in jobs], progress=progress)
        except MoaError as exc:
            for job in jobs:
                job.finish(self._failure(str(exc)))
            return
        for job, result in zip(jobs, results, strict=True):
            if result.ok:
                job.finish(_answer(result, recipe, trace=job.want_trace))
            else:
                job.finish(self._failure(result.error or "the conversation failed"))

    def _stream_chunked(self, job: Job) -> None:
        recipe = self.recipe_for(job.overrides)
        run = ChunkedAggregation(MoAPipeline(recipe, self.runner), Conversation(job.id, job.messages))
        deltas = run.deltas()
        try:
            for delta in deltas:
                job.emit(delta)
                if job.cancelled.is_set():
                    break
        except ConversationFailed as exc:
            job.finish(self._failure(str(exc)))
            return
        finally:
            close = getattr(deltas, "close", None)
            if close is not None:
                close()
        job.finish(_answer(run.result(), recipe, trace=job.want_trace))

    def recipe_for(self, overrides: Overrides) -> Recipe:
        every = {k: v for k, v in (("temperature", overrides.temperature), ("top_p", overrides.top_p), ("seed", overrides.seed)) if v is not None}
        final = {k: v for k, v in (("max_tokens", overrides.max_tokens), ("stop", overrides.stop)) if v is not None}
        if not every and not final:
            return self.recipe
        return self.recipe.model_copy(
            update={
                "proposers": [_with_sampling(r, every) for r in self.recipe.proposers],
                "aggregator": _with_sampling(self.recipe.aggregator, {**every, **final}),
            }
        )

    # -- single-model jobs ----------------------------------------------------------------------------------------

    def _single_request(self, job: Job) -> Request:
        base = self.recipe.aggregator if self.recipe.aggregator.model == job.target else next(
            r for r in self.recipe.proposers if r.model == job.target
        )
        o = job.overrides
        changes = {"max_tokens": o.max_tokens, "temperature": o.temperature, "top_p": o.top_p, "seed": o.seed, "stop": o.stop}
        role = _with_sampling(base, {k: v for k, v in changes.items() if v is not None})
        return Request(messages=job.messages, sampling=role.sampling, request_id=f"{job.id}/single/{job.target}")

    def _run_singles(self, jobs: list[Job]) -> None:
        batches: dict[str, list[Request]] = {}
        owners: dict[str, list[Job]] = {}
        for job in jobs:
            batches.setdefault(job.target, []).append(self._single_request(job))
            owners.setdefault(job.target, []).append(job)
        try:
            outputs = self.runner.run(batches)
        except EngineError as exc:
            for job in jobs:
                job.finish(self._failure(str(exc), single=True))
            return
        for model, members in owners.items():
            gens = outputs.get(model) or [Generation.failed(f"engine '{model}' returned no answer")] * len(members)
            for job, gen in zip(members, gens, strict=True):
                if gen.ok:
                    finish = gen.finish_reason if gen.finish_reason in ("stop", "length") else "stop"
                    job.finish(Answer(gen.text or "", finish, gen.usage.prompt_tokens, gen.usage.completion_tokens))
                else:
                    job.finish(self._failure(gen.error or "generation failed", single=True))

    def _stream_single(self, job: Job) -> None:
        request = self._single_request(job)
        text, count = "", 0
        try:
            for delta in self.runner.stream(job.target, request):
                if delta:
                    text, count = text + delta, count + 1
                    job.emit(delta)
                if job.cancelled.is_set():
                    break
        except Exception as exc:  # the engine's failure is this request's failure, reported to its client
            job.finish(self._failure(str(exc), single=True))
            return
        finish = "length" if count >= request.sampling.max_tokens else "stop"
        job.finish(Answer(text, finish, 0, count))

    # -- helpers --------------------------------------------------------------------------------------------------

    def _models_of(self, job: Job) -> list[str]:
        return self.models if job.target == self.recipe.name else [job.target]

    def _roles(self, job: Job) -> list[Role]:
        if job.target == self.recipe.name:
            recipe = self.recipe_for(job.overrides)
            return [*recipe.proposer_roles(), recipe.aggregator_role()]
        sampling = self._single_request(job).sampling
        return [Role(model=job.target, name=job.target, sampling=sampling)]

    def _failure(self, message: str, *, single: bool = False) -> MoaError:
        """Classify a failed generation: a dead engine (503), a too-long prompt (400), or a failed answer (500)."""
        dead = sorted(m for m, ok in self.health().items() if not ok)
        if dead:
            return EngineDiedError(f"the engine for {', '.join(dead)} is down ({message}); restart the server")
        if _CONTEXT_ERROR.search(message):
            return PromptTooLongError(message)
        return EngineError(message) if single else ConversationFailed(message)


class _AggregatorStreams:
    """A LayerRunner over the MoA's runner for streamed requests: the layers pass through as batches; in the
    aggregator stage each conversation's request is streamed and its deltas go to its job as they are written. A
    retry after a broken stream continues the answer the client already has (assistant prefix)."""

    def __init__(self, inner: LayerRunner, jobs: dict[str, Job]) -> None:
        self.inner = inner
        self.jobs = jobs
        self.stage = ""
        self.written: dict[str, str] = {}
        self.counts: dict[str, int] = {}

    def progress(self, stage: str, done: int, total: int) -> None:
        self.stage = stage

    def run(self, batches: dict[str, list[Request]]) -> dict[str, list[Generation]]:
        if self.stage != "aggregator":
            return self.inner.run(batches)
        out: dict[str, list[Generation]] = {}
        for model, requests in batches.items():
            with ThreadPoolExecutor(max_workers=max(1, len(requests)), thread_name_prefix="moa-agg-stream") as pool:
                out[model] = list(pool.map(partial(self._stream_one, model), requests))
        return out

    def stream(self, model_id: str, request: Request) -> Iterator[str]:
        return self.inner.stream(model_id, request)

    def _stream_one(self, model: str, request: Request) -> Generation:
        job = self.jobs[request.request_id.split("/", 1)[0]]  # request ids start with the conversation id
        start = time.perf_counter()
        text = self.written.get(job.id, "")
        if text:
            request = replace(request, messages=[*request.messages, {"role": "assistant", "content": text}])
        try:
            for delta in self.inner.stream(model, request):
                if delta:
                    text += delta
                    self.written[job.id] = text
                    self.counts[job.id] = self.counts.get(job.id, 0) + 1
                    job.emit(delta)
                if job.cancelled.is_set():
                    break
        except Exception as exc:  # recorded as this aggregator's failure; the policy retries it
            return Generation.failed(str(exc), seconds=time.perf_counter() - start)
        count = self.counts.get(job.id, 0)
        finish = "length" if count >= request.sampling.max_tokens else "stop"
        return Generation(text=text, usage=Usage(0, count), seconds=time.perf_counter() - start, finish_reason=finish)


def _with_sampling(role: Role, changes: dict[str, Any]) -> Role:
    if not changes:
        return role
    if "stop" in changes and changes["stop"] is not None:
        changes = {**changes, "stop": list(changes["stop"])}
    return role.model_copy(update={"sampling": Sampling.model_validate({**role.sampling.model_dump(), **changes})})


@lru_cache(maxsize=64)
def _model_context(model_id: str) -> int:
    return load_model_config(model_id).architecture.max_context


def _context_of(recipe: Recipe, model_id: str) -> int:
    return recipe.engine_options(model_id).max_model_len or _model_context(model_id)


def _answer(result: Result, recipe: Recipe, *, trace: bool) -> Answer:
    agg = result.aggregator
    agg_tokens = agg.usage.completion_tokens if agg is not None else 0
    total = result.usage
    finish = "length" if agg_tokens >= recipe.aggregator.sampling.max_tokens else "stop"
    return Answer(
        text=result.output or "",
        finish_reason=finish,
        prompt_tokens=total.prompt_tokens,
        completion_tokens=total.completion_tokens,
        hidden_tokens=total.completion_tokens - agg_tokens,
        trace=result.trace() if trace else None,
    )
