"""A pool of resident engines, one per model: the Runner for plans whose models all fit at once, and the container
the phased runner fills phase by phase.

Starts engines one after another, or all at once when the caller says they load without interfering (vLLM-CPU
engines on disjoint cores; co-located vLLM GPU engines profile free memory at start-up and must not overlap), routes
each request to its model's engine the moment it is submitted, keeps per-engine counters (requests, busy seconds:
the time during which the engine had at least one request in flight), and closes every engine on exit. Knows
nothing about layers, references or plans.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from moa_local.engines.base import (
    DONE_TICKET,
    Engine,
    Generation,
    OnDelta,
    OnDone,
    Request,
    Runner,
    Ticket,
)
from moa_local.errors import EngineDiedError, EngineError

EngineFactory = Callable[[str], Engine]


@dataclass
class EngineStats:
    """What one engine did: requests answered, tokens, and busy time (at least one request in flight)."""

    requests: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    busy_s: float = 0.0
    in_flight: int = 0
    _since: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def begin(self) -> None:
        with self._lock:
            if self.in_flight == 0:
                self._since = time.perf_counter()
            self.in_flight += 1

    def end(self, gen: Generation) -> None:
        with self._lock:
            self.in_flight -= 1
            if self.in_flight == 0:
                self.busy_s += time.perf_counter() - self._since
            self.requests += 1
            self.failed += 0 if gen.ok else 1
            self.prompt_tokens += gen.usage.prompt_tokens
            self.completion_tokens += gen.usage.completion_tokens

    def busy_now(self) -> float:
        """Busy seconds so far, counting a busy spell still open."""
        with self._lock:
            return self.busy_s + (time.perf_counter() - self._since if self.in_flight else 0.0)

    def to_dict(self) -> dict[str, float | int]:
        return {"requests": self.requests, "failed": self.failed, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "busy_s": round(self.busy_now(), 3)}


def close_engines(engines: Iterable[tuple[str, Engine]], *, on_closed: Callable[[str], None] | None = None) -> list[str]:
    """Close each engine, the others anyway when one fails; returns "model: error" for those that failed."""
    errors = []
    for model_id, engine in engines:
        try:
            engine.close()
        except Exception as exc:  # close the others anyway; the caller reports
            errors.append(f"{model_id}: {exc}")
        if on_closed is not None:
            on_closed(model_id)
    return errors


class EnginePool(Runner):
    """Owns one engine per model id. ``factory`` builds an engine for a model id (tests pass fakes)."""

    def __init__(self, model_ids: Sequence[str], *, factory: EngineFactory, log: Callable[[str], None] | None = None,
                 parallel: bool = False) -> None:
        """``parallel``: call the factories at once, from threads (engines that load without interfering)."""
        self.engines: dict[str, Engine] = {}
        self.stats: dict[str, EngineStats] = {}
        self.starts: dict[str, int] = {}
        """Model id -> engines started for it (a phased runner starts some more than once)."""
        self._log = log or (lambda msg: print(msg, file=sys.stderr))
        try:
            if parallel and len(model_ids) > 1:
                failed = self.start_parallel(model_ids, factory)
                if failed:
                    raise next(iter(failed.values()))
            for model_id in model_ids:
                if model_id not in self.engines:
                    self._log(f"starting engine for {model_id} ...")
                    self.add(model_id, factory(model_id))
        except BaseException:
            self.close()
            raise

    def add(self, model_id: str, engine: Engine) -> None:
        """Make ``engine`` the one serving ``model_id``."""
        self.engines[model_id] = engine
        self.stats.setdefault(model_id, EngineStats())
        self.starts[model_id] = self.starts.get(model_id, 0) + 1

    def start_parallel(self, model_ids: Sequence[str], factory: EngineFactory) -> dict[str, Exception]:
        """Start engines for ``model_ids`` at once; returns {model id: error} for those that failed."""
        self._log(f"starting engines for {', '.join(model_ids)} at once ...")
        pool = ThreadPoolExecutor(max_workers=len(model_ids), thread_name_prefix="moa-start")
        errors: dict[str, Exception] = {}
        try:
            futures = {m: pool.submit(factory, m) for m in model_ids}
            for model_id, future in futures.items():
                try:
                    self.add(model_id, future.result())
                except Exception as exc:  # keep the others to close them
                    errors[model_id] = exc
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
        return errors

    def engine(self, model_id: str) -> Engine:
        try:
            return self.engines[model_id]
        except KeyError:
            raise EngineError(f"no engine for model '{model_id}'; loaded: {', '.join(self.engines)}") from None

    def submit(self, model_id: str, request: Request, *, on_done: OnDone, on_delta: OnDelta | None = None) -> Ticket:
        engine = self.engines.get(model_id)
        if engine is None:
            on_done(Generation.failed(f"no engine for model '{model_id}'; loaded: {', '.join(self.engines)}",
                                      kind="engine_down"))
            return DONE_TICKET
        stats = self.stats[model_id]
        stats.begin()

        def done(gen: Generation) -> None:
            stats.end(gen)
            on_done(gen)

        return engine.submit(request, on_done=done, on_delta=on_delta)

    def model_ids(self) -> list[str]:
        return list(self.engines)

    def health(self) -> dict[str, bool]:
        return {m: e.is_alive() for m, e in self.engines.items()}

    def usage(self) -> dict[str, dict[str, float | int]]:
        """Per model: requests, tokens and busy seconds so far."""
        return {m: s.to_dict() for m, s in self.stats.items()}

    def close(self) -> None:
        errors = close_engines(reversed(list(self.engines.items())))
        self.engines.clear()
        if errors:
            raise EngineDiedError("errors while closing engines: " + "; ".join(errors))
