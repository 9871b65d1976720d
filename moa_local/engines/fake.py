"""The fake backend: deterministic, instant (or as slow as asked), scriptable. Ships in the package for tests, docs
and dry runs. It never stands in for a real engine in a test whose point is the real engine.

Its default answer names the model, echoes the start of the last user turn and says how many references it was
shown, so tests can see reference injection work without a model. Its tokens are words; with ``max_model_len`` set a
prompt too long for it fails with kind too_long and the numbers a real engine gives. Requests are independent, as in
a continuous batching engine with room to spare: each one finishes ``latency_s`` + ``token_delay_s`` x its words
after it was submitted, whatever else is in flight (one timer thread per engine keeps the clock; with no delay the
answer comes before ``submit`` returns). The last ``RECORD_LIMIT`` requests are kept in ``requests`` / ``streams``
for tests.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from moa_local.config.recipe import FakeOptions, Recipe
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

if TYPE_CHECKING:
    from moa_local.engines.pool import EnginePool

Responder = Callable[[Request, str], str]

RECORD_LIMIT = 1_000
"""Requests a FakeEngine remembers (the most recent), so a million-prompt job does not grow its memory."""

_WORDS = (
    "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet", "kilo",
    "lima", "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango", "uniform", "victor",
    "whiskey", "xray", "yankee", "zulu",
)


def count_references(request: Request) -> int:
    """How many numbered candidate responses the system message carries."""
    system = next((m["content"] for m in request.messages if m["role"] == "system"), "")
    if "Candidate responses:" not in system:
        return 0
    tail = system.split("Candidate responses:", 1)[1]
    return sum(1 for line in tail.splitlines() if line[:1].isdigit() and ". " in line[:5])


def default_responder(request: Request, model_id: str) -> str:
    last_user = next((m["content"] for m in reversed(request.messages) if m["role"] == "user"), "")
    key = f"{model_id}|{request.messages}|{request.sampling.seed if request.sampling.temperature else 'greedy'}"
    digest = hashlib.sha256(key.encode()).digest()
    words = " ".join(_WORDS[b % len(_WORDS)] for b in digest[:6])
    refs = count_references(request)
    seen = f" (synthesized {refs} references)" if refs else ""
    return f"[{model_id}] {words} on: {last_user[:60]}{seen}"


class _Clock:
    """One timer thread: runs callbacks at their due time (monotonic), in order."""

    def __init__(self, name: str) -> None:
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name=f"moa-fake-{name}", daemon=True)
        self._thread.start()

    def at(self, due: float, action: Callable[[], None]) -> None:
        with self._cond:
            heapq.heappush(self._heap, (due, next(self._seq), action))
            self._cond.notify()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._heap or self._heap[0][0] > time.monotonic():
                    self._cond.wait(None if not self._heap else self._heap[0][0] - time.monotonic())
                _, _, action = heapq.heappop(self._heap)
            action()


class FakeEngine(Engine):
    """A deterministic engine. ``responder`` scripts answers; ``options`` adds latency and failures."""

    def __init__(self, model_id: str, *, options: FakeOptions | None = None, responder: Responder | None = None) -> None:
        self.model_id = model_id
        self.options = options or FakeOptions()
        self.responder = responder or default_responder
        self.requests: deque[Request] = deque(maxlen=RECORD_LIMIT)
        """Non-streamed requests, in submission order (the most recent RECORD_LIMIT)."""
        self.streams: deque[Request] = deque(maxlen=RECORD_LIMIT)
        """Streamed requests, likewise."""
        self.submitted = 0
        self.closed = False
        self._lock = threading.Lock()
        self._clock: _Clock | None = None
        self._live: dict[int, tuple[OnDone, list[bool]]] = {}
        self._ids = itertools.count()

    def _answer(self, request: Request) -> Generation:
        last = next((m["content"] for m in reversed(request.messages) if m["role"] == "user"), "")
        if self.options.fail_if_contains and self.options.fail_if_contains in last:
            return Generation.failed(f"fake failure: request contains {self.options.fail_if_contains!r}")
        prompt_tokens = sum(len(m["content"].split()) for m in request.messages)
        limit = self.options.max_model_len
        if limit is not None and prompt_tokens + request.sampling.max_tokens > limit:
            overflow = Overflow(prompt_tokens, request.sampling.max_tokens, limit)
            return Generation.too_long(overflow, model_id=self.model_id)
        if request.messages and request.messages[-1]["role"] == "assistant":
            # Continue a partial answer: the words of the whole answer after the ones already written.
            prefix = request.messages[-1]["content"].split()
            rest = self.responder(replace(request, messages=request.messages[:-1]), self.model_id).split()[len(prefix):]
            text = " " + " ".join(rest) if rest else ""
        else:
            text = self.responder(request, self.model_id)
        words = text.split()
        if len(words) > request.sampling.max_tokens:
            text = (" " if text.startswith(" ") else "") + " ".join(words[: request.sampling.max_tokens])
            finish = "length"
        else:
            finish = "stop"
        return Generation(text=text, usage=Usage(prompt_tokens, len(text.split())), finish_reason=finish)

    def _pieces(self, text: str) -> list[str]:
        words = text.split(" ")
        step = self.options.tokens_per_chunk
        return [(" " if i else "") + " ".join(words[i : i + step]) for i in range(0, len(words), step)]

    def submit(self, request: Request, *, on_done: OnDone, on_delta: OnDelta | None = None) -> Ticket:
        if self.closed:
            on_done(Generation.failed(f"fake engine '{self.model_id}' is closed", kind="engine_down"))
            return DONE_TICKET
        with self._lock:
            (self.streams if on_delta is not None else self.requests).append(request)
            self.submitted += 1
        started = time.perf_counter()
        gen = self._answer(request)
        pieces = self._pieces(gen.text or "") if on_delta is not None and gen.ok else []
        opts = self.options
        if not (opts.latency_s or opts.token_delay_s):  # instant: answer before returning
            for piece in pieces:
                on_delta(piece)  # type: ignore[misc]
            gen.seconds = time.perf_counter() - started
            on_done(gen)
            return DONE_TICKET
        return self._schedule(gen, pieces, on_done, on_delta, started)

    def _schedule(self, gen: Generation, pieces: list[str], on_done: OnDone, on_delta: OnDelta | None,
                  started: float) -> Ticket:
        """Deliver ``gen`` (and its pieces) on the clock: latency spread over the pieces, token_delay per word."""
        opts = self.options
        with self._lock:
            if self._clock is None:
                self._clock = _Clock(self.model_id)
            key = next(self._ids)
            cancelled = [False]
            self._live[key] = (on_done, cancelled)
        clock, now = self._clock, time.monotonic()
        due = now
        per_piece = opts.latency_s / max(1, len(pieces))
        for piece in pieces:
            due += per_piece + opts.token_delay_s * len([w for w in piece.split(" ") if w])
            clock.at(due, lambda p=piece: None if cancelled[0] else on_delta(p))  # type: ignore[misc]
        if not pieces:
            due += opts.latency_s + opts.token_delay_s * gen.usage.completion_tokens

        def finish() -> None:
            with self._lock:
                if self._live.pop(key, None) is None:
                    return  # cancelled or closed: answered already
            gen.seconds = time.perf_counter() - started
            on_done(gen)

        clock.at(due, finish)

        def cancel() -> None:
            cancelled[0] = True
            with self._lock:
                live = self._live.pop(key, None)
            if live is not None:
                live[0](Generation.failed("request aborted", kind="aborted", seconds=time.perf_counter() - started))

        return Ticket(cancel)

    def memory(self) -> MemoryReport:
        return MemoryReport(device="none")

    def is_alive(self) -> bool:
        return not self.closed

    def close(self) -> None:
        self.closed = True
        with self._lock:
            live, self._live = list(self._live.values()), {}
        for on_done, cancelled in live:
            cancelled[0] = True
            on_done(Generation.failed(f"fake engine '{self.model_id}' was closed", kind="engine_down"))


def fake_pool(recipe: Recipe, *, responder: Responder | None = None) -> EnginePool:
    """A resident pool of FakeEngines for ``recipe`` (tests and docs), whatever the recipe's backend."""
    from moa_local.engines.pool import EnginePool

    return EnginePool(
        recipe.model_ids(),
        factory=lambda mid: FakeEngine(mid, options=recipe.engine_options(mid).fake, responder=responder),
        log=lambda _msg: None,
    )
