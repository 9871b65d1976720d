"""The server's side of the scheduler: every request enters the same scheduler as batch jobs, at once.

A MoA request becomes one conversation submitted to the loaded MoA's FlowScheduler (its own recipe variant when
the request overrides sampling), so it starts the moment it arrives, alongside whatever is in flight: nobody waits
for another request's batch. A request to one model goes straight to that engine. A streamed MoA request with
``aggregation: chunked`` runs its wavefront (pipeline/chunked.py) on its own thread. The limit: ``window``
conversations running and ``max_queue`` waiting; beyond that ``submit`` refuses (ServerBusy, HTTP 429).

Events go to each job's ``sink``, from scheduler and engine threads: ``str`` deltas of the answer (streamed jobs),
``RoleEvent``s (jobs that asked for every role's events), then exactly one ``Answer`` or one ``MoaError`` chosen by
the failure's kind (never by its message). Owns: the door checks (target, context length, engine health), the
per-request recipe variants, the limits. Never touches HTTP.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from moa_local.api import MoA
from moa_local.config.recipe import Recipe, Role
from moa_local.config.registry import load_model_config
from moa_local.engines.base import Generation, Request, Ticket
from moa_local.errors import (
    EngineDiedError,
    EngineError,
    InputError,
    MoaError,
    PromptTooLongError,
    ServerBusy,
)
from moa_local.pipeline import Conversation, FlowScheduler, Result, RoleEvent, failure_error
from moa_local.pipeline.scheduler import Watch
from moa_local.prompts import Message


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


Event = str | RoleEvent | Answer | MoaError
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
    events: bool = False
    """Send every role's RoleEvents (start, delta, done) too."""
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    done: bool = False
    _cancel: Callable[[], None] | None = None

    def emit(self, item: str | RoleEvent) -> None:
        if not self.done:
            self.sink(item)

    def finish(self, item: Answer | MoaError) -> None:
        if not self.done:
            self.done = True
            self.sink(item)

    def cancel(self) -> None:
        """The client left: stop working on it."""
        cancel, self._cancel = self._cancel, None
        self.done = True
        if cancel is not None:
            cancel()


class Dispatcher:
    """The door in front of a loaded MoA. Thread-safe; ``submit`` never blocks."""

    def __init__(self, moa: MoA, *, window: int | None = None, max_queue: int = 256) -> None:
        self.moa = moa
        self.recipe = moa.recipe
        self.runner = moa.runner
        self.window = window or moa.pipeline.window
        self.max_queue = max_queue
        self.scheduler = FlowScheduler(self.recipe, self.runner, window=self.window, max_queue=max_queue).start()
        self._others = 0  # single-model and chunked jobs in flight
        self._lock = threading.Lock()
        self._variants: dict[Overrides, Recipe] = {}
        self._closed = False

    @property
    def models(self) -> list[str]:
        return self.recipe.model_ids()

    def depth(self) -> tuple[int, int]:
        """(queued, running) requests."""
        queued, running = self.scheduler.depth()
        with self._lock:
            return queued, running + self._others

    def health(self) -> dict[str, bool]:
        return dict(self.runner.health())

    def submit(self, job: Job) -> None:
        """Start a job. Raises InputError (unknown target), PromptTooLongError (never fits), ServerBusy (full),
        EngineDiedError (an engine it needs is down, or the server is closing)."""
        if job.target != self.recipe.name and job.target not in self.models:
            raise InputError(f"unknown model '{job.target}'; serving {', '.join([self.recipe.name, *self.models])}")
        self.check_context(job)
        needed = self.models if job.target == self.recipe.name else [job.target]
        health = self.health()
        down = sorted(m for m in needed if not health.get(m, True))
        if down:
            raise EngineDiedError(f"the engine for {', '.join(down)} is down; restart the server")
        if self._closed:
            raise EngineDiedError("the server is shutting down")
        if job.target != self.recipe.name:
            self._start_other(job, self._run_single)
        elif job.stream and self.recipe.aggregation == "chunked":
            self._start_other(job, self._run_chunked)
        else:
            self._run_moa(job)

    def check_context(self, job: Job) -> None:
        """Reject a prompt that cannot fit: its word count (a lower bound on tokens) plus the answer's max_tokens
        exceeds an engine's context (the plan's max_model_len when there is a plan). Prompts that slip past fail in
        the engine with kind "too_long", reported the same way."""
        words = sum(len(m["content"].split()) for m in job.messages)
        for role in self._roles(job):
            need = words + len((role.system_prompt or "").split()) + role.sampling.max_tokens
            limit = self.context_of(role.model)
            if need > limit:
                raise PromptTooLongError(
                    f"the conversation holds at least {words} tokens and '{role.name or role.model}' may answer with "
                    f"{role.sampling.max_tokens}: more than the {limit}-token context of '{role.model}'. "
                    "Shorten the conversation or lower max_tokens."
                )

    def context_of(self, model_id: str) -> int:
        plan = self.moa.plan
        if plan is not None and plan.device != "none":
            try:
                return plan.engine(model_id).max_model_len
            except KeyError:
                pass
        return self.recipe.engine_options(model_id).max_model_len or _model_context(model_id)

    def close(self) -> None:
        """Stop taking jobs; fail those in flight."""
        self._closed = True
        self.scheduler.close()

    # -- MoA jobs -------------------------------------------------------------------------------------------------

    def _run_moa(self, job: Job) -> None:
        recipe = self.recipe_for(job.overrides)

        def listener(event: RoleEvent) -> None:
            if job.events and not (event.kind == "delta" and event.aggregator):
                job.emit(event)
            if job.stream and event.kind == "delta" and event.aggregator:
                job.emit(event.delta)

        def on_result(result: Result) -> None:
            job.finish(_answer(result, recipe, trace=job.want_trace) if result.ok else failure_error(result))

        watch: Watch = "all" if job.events else "final" if job.stream else "none"
        handle = self.scheduler.submit(Conversation(job.id, job.messages), on_result,
                                       listener=listener if (job.stream or job.events) else None,
                                       watch=watch, recipe=recipe)
        job._cancel = handle.cancel

    def _start_other(self, job: Job, run: Callable[[Job], None]) -> None:
        with self._lock:
            queued, running = self.scheduler.depth()
            if queued + running + self._others >= self.window + self.max_queue:
                raise ServerBusy(f"{running + self._others} requests are running and {queued} waiting; retry later")
            self._others += 1

        def body() -> None:
            try:
                run(job)
            except Exception as exc:  # a bug here must still answer the client
                job.finish(EngineError(f"internal error: {exc!r}"))
            finally:
                with self._lock:
                    self._others -= 1

        threading.Thread(target=body, name=f"moa-job-{job.id[:8]}", daemon=True).start()

    def _run_chunked(self, job: Job) -> None:
        from moa_local.pipeline.chunked import ChunkedAggregation

        recipe = self.recipe_for(job.overrides)
        run = ChunkedAggregation(recipe, self.runner, Conversation(job.id, job.messages),
                                 listener=(lambda e: job.emit(e) if not (e.aggregator and e.kind == "delta") else None)
                                 if job.events else None)
        job._cancel = run.close
        deltas = run.deltas()  # a generator: closed below
        try:
            for delta in deltas:
                job.emit(delta)
                if job.done:
                    break
        except MoaError:
            result = run.result()
            job.finish(failure_error(result) if not result.ok else EngineError("the conversation failed"))
            return
        finally:
            deltas.close()  # type: ignore[attr-defined]
        job.finish(_answer(run.result(), recipe, trace=job.want_trace))

    def recipe_for(self, overrides: Overrides) -> Recipe:
        """The recipe with a request's overrides (the last 256 kept)."""
        with self._lock:
            variant = self._variants.get(overrides)
        if variant is None:
            variant = _variant(self.recipe, overrides)
            with self._lock:
                if len(self._variants) >= 256:
                    self._variants.clear()
                self._variants[overrides] = variant
        return variant

    # -- single-model jobs ----------------------------------------------------------------------------------------

    def _single_role(self, job: Job) -> Role:
        base = self.recipe.aggregator if self.recipe.aggregator.model == job.target else next(
            r for r in self.recipe.proposers if r.model == job.target
        )
        o = job.overrides
        return base.with_sampling(max_tokens=o.max_tokens, temperature=o.temperature, top_p=o.top_p, seed=o.seed,
                                  stop=o.stop)

    def _run_single(self, job: Job) -> None:
        role = self._single_role(job)
        request = Request(messages=job.messages, sampling=role.sampling, request_id=f"{job.id}/single/{job.target}")
        finished = threading.Event()
        outcome: list[Generation] = []

        def on_done(gen: Generation) -> None:
            outcome.append(gen)
            finished.set()

        ticket: Ticket = self.runner.submit(job.target, request, on_done=on_done,
                                            on_delta=job.emit if job.stream else None)
        job._cancel = ticket.cancel
        finished.wait()
        gen = outcome[0]
        if gen.ok:
            finish = gen.finish_reason if gen.finish_reason in ("stop", "length") else "stop"
            job.finish(Answer(gen.text or "", finish, gen.usage.prompt_tokens, gen.usage.completion_tokens))
        else:
            job.finish(failure_error(Result(id=job.id, output=None, error=gen.error, kind=gen.kind)))

    def _roles(self, job: Job) -> list[Role]:
        if job.target == self.recipe.name:
            recipe = self.recipe_for(job.overrides)
            return [*recipe.proposer_roles(), recipe.aggregator_role()]
        return [self._single_role(job).model_copy(update={"name": job.target})]


def _variant(recipe: Recipe, o: Overrides) -> Recipe:
    """``recipe`` with a request's overrides: temperature/top_p/seed on every role, max_tokens/stop on the
    aggregator."""
    every = {"temperature": o.temperature, "top_p": o.top_p, "seed": o.seed}
    if all(v is None for v in (*every.values(), o.max_tokens, o.stop)):
        return recipe
    return recipe.model_copy(update={
        "proposers": [r.with_sampling(**every) for r in recipe.proposers],
        "aggregator": recipe.aggregator.with_sampling(**every, max_tokens=o.max_tokens, stop=o.stop),
    })


@lru_cache(maxsize=64)
def _model_context(model_id: str) -> int:
    return load_model_config(model_id).architecture.max_context


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
