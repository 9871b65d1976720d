"""The fake backend: deterministic, instant (or as slow as asked), scriptable. Ships in the package for tests, docs
and dry runs. It never stands in for a real engine in a test whose point is the real engine.

Its default answer names the model, echoes the start of the last user turn and says how many references it was
shown, so tests can see reference injection work without a model.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from moa_local.config.recipe import FakeOptions, Recipe
from moa_local.engines.base import Engine, Generation, MemoryReport, Request, Usage
from moa_local.errors import EngineDiedError

if TYPE_CHECKING:
    from moa_local.engines.pool import EnginePool

Responder = Callable[[Request, str], str]

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


class FakeEngine(Engine):
    """A deterministic engine. ``responder`` scripts answers; ``options`` adds latency and failures."""

    def __init__(self, model_id: str, *, options: FakeOptions | None = None, responder: Responder | None = None) -> None:
        self.model_id = model_id
        self.options = options or FakeOptions()
        self.responder = responder or default_responder
        self.calls: list[list[Request]] = []
        self.streams: list[Request] = []
        self.closed = False
        self._lock = threading.Lock()

    def _answer(self, request: Request) -> Generation:
        start = time.perf_counter()
        last = next((m["content"] for m in reversed(request.messages) if m["role"] == "user"), "")
        if self.options.fail_if_contains and self.options.fail_if_contains in last:
            return Generation.failed(f"fake failure: request contains {self.options.fail_if_contains!r}")
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
        prompt_tokens = sum(len(m["content"].split()) for m in request.messages)
        return Generation(
            text=text,
            usage=Usage(prompt_tokens, len(text.split())),
            seconds=time.perf_counter() - start + self.options.latency_s,
            finish_reason=finish,
        )

    def generate(self, requests: Sequence[Request]) -> list[Generation]:
        if self.closed:
            raise EngineDiedError(f"fake engine '{self.model_id}' is closed")
        with self._lock:
            self.calls.append(list(requests))
        if self.options.latency_s:
            time.sleep(self.options.latency_s)
        answers = [self._answer(r) for r in requests]
        if self.options.token_delay_s:
            time.sleep(self.options.token_delay_s * max((g.usage.completion_tokens for g in answers), default=0))
        return answers

    def stream(self, request: Request) -> Iterator[str]:
        if self.closed:
            raise EngineDiedError(f"fake engine '{self.model_id}' is closed")
        with self._lock:
            self.streams.append(request)
        gen = self._answer(request)
        if gen.error:
            from moa_local.errors import EngineError

            raise EngineError(f"{self.model_id}: {gen.error}")
        words = (gen.text or "").split(" ")
        step = self.options.tokens_per_chunk
        delay = self.options.latency_s / max(1, len(words))
        for i in range(0, len(words), step):
            if delay:
                time.sleep(delay)
            if self.options.token_delay_s:
                time.sleep(self.options.token_delay_s * len([w for w in words[i : i + step] if w]))
            yield (" " if i else "") + " ".join(words[i : i + step])

    def memory(self) -> MemoryReport:
        return MemoryReport(device="none")

    def is_alive(self) -> bool:
        return not self.closed

    def close(self) -> None:
        self.closed = True


def fake_pool(recipe: Recipe, *, responder: Responder | None = None) -> EnginePool:
    """A resident pool of FakeEngines for ``recipe`` (tests and docs), whatever the recipe's backend."""
    from moa_local.engines.pool import EnginePool

    return EnginePool(
        recipe.model_ids(),
        factory=lambda mid: FakeEngine(mid, options=recipe.engine_options(mid).fake, responder=responder),
        log=lambda _msg: None,
    )
