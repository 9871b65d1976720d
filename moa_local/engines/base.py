"""The one engine interface the pipeline sees. Backends (fake, transformers, vllm) differ behind it and nowhere else.

An engine serves one model and takes work at any time: ``submit(request, on_done=...)`` starts one request at once
(the engine batches whatever is in flight: vLLM's continuous batching, or a dispatcher that runs the queue as one
batch), and ``on_done`` gets its Generation exactly once, from whatever thread finishes it. Failures of a request
(an over-long prompt, a rejected prompt, a dead engine) are Generations with ``error`` and a ``kind``, never
exceptions, so one bad prompt never sinks the others. ``generate`` (a batch, waited for) and ``stream`` (the deltas
of one answer) are built on ``submit``.

A ``Runner`` owns the engines of a recipe (resident, phased or remote) and offers the same ``submit`` by model id,
plus ``health`` and ``close``. Neither knows about layers, references or recipes.
"""

from __future__ import annotations

import abc
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

from moa_local.config.recipe import Sampling
from moa_local.prompts import Message

ErrorKind = Literal["too_long", "invalid", "engine_down", "aborted", "failed"]
"""Why a request failed: too_long (prompt + max_tokens exceed the context), invalid (the prompt could not be
rendered or the engine refused it), engine_down (the engine died, is closed or could not start), aborted
(cancelled), failed (anything else the engine reported)."""


@dataclass(frozen=True)
class Request:
    """One generation request: a conversation and how to sample the answer."""

    messages: list[Message]
    sampling: Sampling
    request_id: str = ""


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(self.prompt_tokens + other.prompt_tokens, self.completion_tokens + other.completion_tokens)

    def to_dict(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens}


@dataclass(frozen=True)
class Overflow:
    """The numbers of a too_long failure: the prompt's tokens and the answer's budget exceed the engine's context.
    The pipeline reads these (never the error text) to trim references and try again."""

    prompt_tokens: int
    max_tokens: int
    max_model_len: int

    @property
    def excess(self) -> int:
        """Tokens over the context: prompt + max_tokens - max_model_len."""
        return self.prompt_tokens + self.max_tokens - self.max_model_len

    def message(self, model_id: str) -> str:
        """The error text every backend gives a too_long failure."""
        return (f"prompt of {self.prompt_tokens} tokens + max_tokens {self.max_tokens} exceeds "
                f"max_model_len {self.max_model_len} of '{model_id}'")


@dataclass
class Generation:
    """The answer to one Request: text, or an error message with its kind (never both)."""

    text: str | None
    usage: Usage = field(default_factory=Usage)
    seconds: float = 0.0
    error: str | None = None
    finish_reason: str | None = None
    kind: ErrorKind | None = None
    """Why it failed (None when it did not)."""
    overflow: Overflow | None = None
    """A too_long failure's numbers, when the backend knows them."""

    @property
    def ok(self) -> bool:
        return self.error is None

    @classmethod
    def failed(cls, error: str, *, seconds: float = 0.0, kind: ErrorKind = "failed",
               usage: Usage | None = None) -> Generation:
        return cls(text=None, error=error, seconds=seconds, kind=kind, usage=usage or Usage())

    @classmethod
    def too_long(cls, overflow: Overflow, *, model_id: str) -> Generation:
        """The failure of a request whose prompt + max_tokens exceed the engine's context."""
        return cls(text=None, error=overflow.message(model_id), kind="too_long",
                   usage=Usage(overflow.prompt_tokens, 0), overflow=overflow)


@dataclass(frozen=True)
class MemoryReport:
    """What an engine holds, in bytes (0 where unknown)."""

    weights_bytes: int = 0
    kv_cache_bytes: int = 0
    peak_bytes: int = 0
    device: str = "cpu"


OnDone = Callable[[Generation], None]
OnDelta = Callable[[str], None]


class Ticket:
    """A submitted request. ``cancel()`` asks its engine to stop it; ``on_done`` then still comes exactly once (a
    Generation of kind "aborted" unless it had finished). Idempotent."""

    __slots__ = ("_cancel",)

    def __init__(self, cancel: Callable[[], None] | None = None) -> None:
        self._cancel = cancel

    def cancel(self) -> None:
        cancel, self._cancel = self._cancel, None
        if cancel is not None:
            cancel()


DONE_TICKET = Ticket()
"""The ticket of a request answered before ``submit`` returned (nothing left to cancel)."""


def wait_all(submit: Callable[[int, OnDone], object], count: int) -> list[Generation]:
    """Submit ``count`` requests through ``submit(index, on_done)`` and wait for every answer, in order."""
    results: list[Generation | None] = [None] * count
    left = [count]
    lock = threading.Lock()
    finished = threading.Event()
    if count == 0:
        return []

    def done_at(index: int) -> OnDone:
        def done(gen: Generation) -> None:
            with lock:
                results[index] = gen
                left[0] -= 1
                if left[0] == 0:
                    finished.set()

        return done

    for i in range(count):
        submit(i, done_at(i))
    finished.wait()
    return [g if g is not None else Generation.failed("internal: no answer") for g in results]


_END = object()


def stream_deltas(submit: Callable[[OnDone, OnDelta], Ticket], *, name: str) -> Iterator[str]:
    """The deltas of one request submitted through ``submit(on_done, on_delta)``; raises EngineError when it fails.
    Closing the iterator early cancels the request."""
    from moa_local.errors import EngineDiedError, EngineError

    items: queue.SimpleQueue[object] = queue.SimpleQueue()
    ticket = submit(lambda gen: items.put((_END, gen)), items.put)
    finished = False
    try:
        while True:
            item = items.get()
            if isinstance(item, tuple) and item and item[0] is _END:
                finished = True
                gen: Generation = item[1]
                if gen.error:
                    error = EngineDiedError if gen.kind == "engine_down" else EngineError
                    raise error(f"{name}: {gen.error}")
                return
            yield item  # type: ignore[misc]
    finally:
        if not finished:
            ticket.cancel()


class Engine(abc.ABC):
    """A loaded model. Subclasses implement ``submit`` and ``close``; everything else has a default."""

    model_id: str

    @abc.abstractmethod
    def submit(self, request: Request, *, on_done: OnDone, on_delta: OnDelta | None = None) -> Ticket:
        """Start ``request`` now, alongside whatever is in flight. ``on_done(generation)`` is called exactly once,
        from any thread (keep it short: hand the result over, do not work in it); ``on_delta(text)`` (when given)
        gets the answer's text as it is written, before ``on_done``. Never raises for the request's own failure."""

    def generate(self, requests: Sequence[Request]) -> list[Generation]:
        """Answer every request (submitted together, so the engine batches them); same order as ``requests``."""
        return wait_all(lambda i, done: self.submit(requests[i], on_done=done), len(requests))

    def stream(self, request: Request) -> Iterator[str]:
        """Yield text deltas of one answer; raises EngineError if it fails. Closing early cancels it."""
        return stream_deltas(lambda done, delta: self.submit(request, on_done=done, on_delta=delta), name=self.model_id)

    def memory(self) -> MemoryReport:
        return MemoryReport()

    def is_alive(self) -> bool:
        return True

    @abc.abstractmethod
    def close(self) -> None:
        """Free the model. Idempotent. Requests still in flight get a Generation of kind "engine_down"."""

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class BatchingEngine(Engine):
    """An Engine for backends that generate whole batches (transformers): ``submit`` queues the request and one
    dispatcher thread runs everything queued as one ``run_batch`` (so requests that arrive while a batch runs form
    the next one); streamed requests run one at a time through ``run_stream``. Subclasses call ``_start_dispatcher``
    once loaded and ``_stop_dispatcher`` in ``close``."""

    max_batch: int = 64

    @abc.abstractmethod
    def run_batch(self, requests: Sequence[Request]) -> list[Generation]:
        """Answer a batch (same order); failures as Generations."""

    @abc.abstractmethod
    def run_stream(self, request: Request) -> Iterator[str]:
        """Yield the deltas of one answer; raise on failure."""

    def _start_dispatcher(self) -> None:
        self._queue: queue.SimpleQueue[tuple[Request, OnDone, OnDelta | None, list[bool]] | None] = queue.SimpleQueue()
        self._stopped = False
        self._dispatcher = threading.Thread(target=self._dispatch, name=f"moa-batch-{self.model_id}", daemon=True)
        self._dispatcher.start()

    def _stop_dispatcher(self) -> None:
        if getattr(self, "_dispatcher", None) is None or self._stopped:
            return
        self._stopped = True
        self._queue.put(None)
        if threading.current_thread() is not self._dispatcher:
            self._dispatcher.join(60)

    def submit(self, request: Request, *, on_done: OnDone, on_delta: OnDelta | None = None) -> Ticket:
        if getattr(self, "_stopped", True):
            on_done(Generation.failed(f"engine '{self.model_id}' is closed", kind="engine_down"))
            return DONE_TICKET
        cancelled = [False]
        self._queue.put((request, on_done, on_delta, cancelled))
        return Ticket(lambda: cancelled.__setitem__(0, True))

    def _dispatch(self) -> None:
        from moa_local.errors import EngineDiedError

        while True:
            first = self._queue.get()
            if first is None:
                break
            items = [first]
            while len(items) < self.max_batch:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)
                    break
                items.append(nxt)
            live = []
            for item in items:
                if item[3][0]:
                    item[1](Generation.failed("request aborted", kind="aborted"))
                else:
                    live.append(item)
            batch = [i for i in live if i[2] is None]
            if batch:
                try:
                    gens = self.run_batch([i[0] for i in batch])
                except Exception as exc:  # the backend broke: every request of the batch fails, the engine goes on
                    kind: ErrorKind = "engine_down" if isinstance(exc, EngineDiedError) else "failed"
                    gens = [Generation.failed(f"{type(exc).__name__}: {exc}", kind=kind) for _ in batch]
                for (_, on_done, _, _), gen in zip(batch, gens, strict=True):
                    on_done(gen)
            for request, on_done, on_delta, cancelled in (i for i in live if i[2] is not None):
                on_done(self._stream_one(request, on_delta, cancelled))  # type: ignore[arg-type]
        while True:  # closed: fail what is still queued
            try:
                left = self._queue.get_nowait()
            except queue.Empty:
                return
            if left is not None:
                left[1](Generation.failed(f"engine '{self.model_id}' is closed", kind="engine_down"))

    def _stream_one(self, request: Request, on_delta: OnDelta, cancelled: list[bool]) -> Generation:
        import time

        started = time.perf_counter()
        text, count = "", 0
        deltas = self.run_stream(request)
        try:
            for delta in deltas:
                if delta:
                    text, count = text + delta, count + 1
                    on_delta(delta)
                if cancelled[0]:
                    return Generation.failed("request aborted", kind="aborted", seconds=time.perf_counter() - started)
        except Exception as exc:  # this request's failure
            return Generation.failed(str(exc), seconds=time.perf_counter() - started)
        finally:
            close = getattr(deltas, "close", None)
            if close is not None:
                close()  # a stream left early tells its backend to stop
        finish = "length" if count >= request.sampling.max_tokens else "stop"
        return Generation(text=text, usage=Usage(0, count), seconds=time.perf_counter() - started, finish_reason=finish)


class Runner(abc.ABC):
    """Owns a recipe's engines (resident, phased, or on a cluster) and routes requests to them by model id.

    ``submit`` is the primitive; ``run`` (per-model batches, waited for) and ``stream`` (one answer's deltas) are
    built on it for callers that want a whole batch or one stream."""

    @abc.abstractmethod
    def submit(self, model_id: str, request: Request, *, on_done: OnDone, on_delta: OnDelta | None = None) -> Ticket:
        """Start ``request`` on ``model_id``'s engine (see Engine.submit). An unknown model, or an engine that is
        down or could not start, answers with a failed Generation."""

    @abc.abstractmethod
    def health(self) -> dict[str, bool]:
        """Model id -> whether its engine is usable."""

    @abc.abstractmethod
    def close(self) -> None:
        """Close every engine. Idempotent."""

    def model_ids(self) -> list[str]:
        """The models this runner serves."""
        return list(self.health())

    def run(self, batches: dict[str, list[Request]]) -> dict[str, list[Generation]]:
        """Every model's requests submitted at once; answers per model, in order."""
        flat = [(m, r) for m, reqs in batches.items() for r in reqs]
        gens = wait_all(lambda i, done: self.submit(flat[i][0], flat[i][1], on_done=done), len(flat))
        out: dict[str, list[Generation]] = {m: [] for m in batches}
        for (model_id, _), gen in zip(flat, gens, strict=True):
            out[model_id].append(gen)
        return out

    def stream(self, model_id: str, request: Request) -> Iterator[str]:
        """Text deltas of one answer; raises EngineError when it fails. Closing early cancels it."""
        return stream_deltas(lambda done, delta: self.submit(model_id, request, on_done=done, on_delta=delta),
                             name=model_id)

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
