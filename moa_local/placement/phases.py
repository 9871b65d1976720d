"""The engines of a plan, started and swapped as it says: the one Runner every local run uses.

Owns three things:
  ``start_runner(recipe, plan, backend=...)`` — the one door to local engines: a PhasedRunner with the plan's
  per-engine options (``api.load``, ``eval``, ``serve`` and ``chat`` all come through it).
  ``planned_options(recipe, plan)`` — each engine's EngineOptions: the recipe's, updated with what the plan decided
  (max_model_len, tensor_parallel_size, gpu_memory_utilization, cpu_threads, cpu_kvcache_gib, sleep mode) wherever
  the recipe did not set the value itself, so the plan alone decides cores, GPUs and sleep mode.
  ``PhasedRunner`` — a Runner (``submit``, ``health``, ``close``). A request for a model of the resident phase goes
  to its engine at once. A request for another phase waits; once nothing is in flight on the resident phase, a
  switcher thread swaps to the phase of the oldest waiting request and releases every request waiting for it (and
  while some request waits, new ones for the resident phase wait too, so no phase starves). The stage scheduler
  (pipeline/scheduler.py) submits one step of ``plan.schedule`` for the whole job at a time, so a job swaps once per
  phase change of the schedule whatever its size. Swapping: an engine the plan puts to sleep (``sleep1``/``sleep2``,
  GPU only) is sent ``sleep(level)`` and later ``wake_up()``; every other engine is closed and started again (CPU:
  vLLM sleep mode is CUDA-only). The leaving phase is out before the next one starts, so a memory budget that holds
  one phase is enough. An engine that fails to start fails its own requests (kind "engine_down"; the pipeline's
  failure policy decides), never the whole job. ``stats`` counts starts, closes, sleeps, wakes, swaps and swap
  seconds; ``usage()`` each engine's requests, tokens and busy seconds.

With the whole plan in one phase nothing ever swaps: every engine starts in ``__init__`` (a start failure raises).

Never plans (planner.py does), never imports a backend (the factory builds engines), never knows about layers or
references.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from moa_local.config.recipe import EngineOptions, Recipe
from moa_local.engines.base import DONE_TICKET, Engine, Generation, OnDelta, OnDone, Request, Runner, Ticket
from moa_local.engines.pool import EnginePool, close_engines
from moa_local.errors import EngineDiedError, EngineStartError, MoaError, PlacementError
from moa_local.placement.plan import EnginePlacement, Plan

EngineFactory = Callable[[str, EngineOptions], Engine]
"""Builds an engine for (model id, options). ``PhasedRunner.for_plan`` passes ``create_engine``; tests pass fakes."""

SLEEP_LEVELS = {"sleep1": 1, "sleep2": 2}


# -- the plan's decisions as engine options -------------------------------------------------------------------------


def planned_options(recipe: Recipe, plan: Plan) -> dict[str, EngineOptions]:
    """Per model id: the recipe's EngineOptions updated with the plan's decisions. A value the recipe sets
    explicitly (not None) wins (the planner already honoured it); the fake backend's plan decides nothing."""
    out: dict[str, EngineOptions] = {}
    for model_id in recipe.model_ids():
        options = recipe.engine_options(model_id)
        if plan.device == "none":
            out[model_id] = options
            continue
        decided = _decisions(plan.engine(model_id))
        explicit = {k for k in options.model_fields_set if getattr(options, k) is not None}
        update = {k: v for k, v in decided.items() if k not in explicit}
        out[model_id] = options.model_copy(update=update) if update else options
    return out


def _decisions(engine: EnginePlacement) -> dict[str, Any]:
    decided: dict[str, Any] = {"max_model_len": engine.max_model_len}
    if engine.device == "cuda":
        decided["tensor_parallel_size"] = engine.tensor_parallel_size
        if engine.memory_utilization is not None:
            decided["gpu_memory_utilization"] = engine.memory_utilization
        if engine.swap in SLEEP_LEVELS:  # vLLM can only sleep when started with sleep mode
            decided["enable_sleep_mode"] = True
    else:
        if engine.cpu_threads is not None:
            decided["cpu_threads"] = engine.cpu_threads
        if engine.cpu_kvcache_gib is not None:
            decided["cpu_kvcache_gib"] = engine.cpu_kvcache_gib
    return decided


def start_runner(recipe: Recipe, plan: Plan, *, backend: str, log: Callable[[str], None] | None = None) -> PhasedRunner:
    """Start ``recipe``'s engines as ``plan`` says (the first phase now), with the plan's per-engine options."""
    return PhasedRunner.for_plan(recipe, plan, backend=backend, log=log)


# -- what happened -----------------------------------------------------------------------------------------------


@dataclass
class PhaseStats:
    """Counters of one runner's life. ``swaps`` counts phase changes after the first load; ``swap_s`` their time
    (taking the old phase out and bringing the new one in); ``load_s`` the first phase's cold start."""

    starts: Counter[str] = field(default_factory=Counter)
    closes: Counter[str] = field(default_factory=Counter)
    sleeps: Counter[str] = field(default_factory=Counter)
    wakes: Counter[str] = field(default_factory=Counter)
    swaps: int = 0
    swap_s: float = 0.0
    load_s: float = 0.0
    phases_run: list[int] = field(default_factory=list)
    """Every phase that ran a share of a batch, in order (consecutive repeats collapsed)."""
    start_errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "starts": dict(self.starts),
            "closes": dict(self.closes),
            "sleeps": dict(self.sleeps),
            "wakes": dict(self.wakes),
            "swaps": self.swaps,
            "swap_s": round(self.swap_s, 3),
            "load_s": round(self.load_s, 3),
            "phases_run": list(self.phases_run),
            "start_errors": list(self.start_errors),
        }


# -- the runner ----------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Waiting:
    """A request for a phase that is not resident yet."""

    phase: int
    model_id: str
    request: Request
    on_done: OnDone
    on_delta: OnDelta | None
    ticket: Ticket | None = None  # the engine's, once released
    cancelled: bool = False


class PhasedRunner(Runner):
    """Runs requests phase by phase under ``plan``. ``factory(model_id, options)`` starts one engine; ``options`` are
    the per-model EngineOptions (``planned_options(recipe, plan)`` for real engines); ``parallel``: a phase's engines
    may start at once (CPU engines on disjoint cores; GPU engines start one after another, since each profiles the
    free memory of its GPUs)."""

    def __init__(
        self,
        plan: Plan,
        *,
        factory: EngineFactory,
        options: Mapping[str, EngineOptions],
        log: Callable[[str], None] | None = None,
        parallel: bool = False,
    ) -> None:
        self.plan = plan
        self.options = dict(options)
        self.stats = PhaseStats()
        self._factory = factory
        self._parallel = parallel
        self._log = log or (lambda msg: print(msg, file=sys.stderr))
        self._phase_of = {e.id: e.phase for e in plan.models}
        self._swap_of = {e.id: e.swap for e in plan.models}
        self._pool = EnginePool([], factory=self._start, log=self._log)
        self._asleep: dict[str, Engine] = {}
        self._failed: dict[str, str] = {}
        """Model id -> why its engine could not start in the resident phase (its requests fail with it)."""
        self._resident: int | None = None
        self._in_flight = 0
        self._waiting: deque[_Waiting] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._switcher: threading.Thread | None = None
        # 1. the first scheduled phase starts now, as a resident pool would: a failure here raises
        first = plan.schedule[0].phase if plan.schedule else 0
        began = time.perf_counter()
        try:
            failed = self._bring_in(first)
        except BaseException:  # Ctrl-C while starting: stop what started
            self.close()
            raise
        if failed:
            self.close()
            raise EngineStartError("; ".join(failed.values()))
        self.stats.load_s = time.perf_counter() - began
        if len(plan.phases) > 1:
            self._switcher = threading.Thread(target=self._switch_loop, name="moa-phases", daemon=True)
            self._switcher.start()

    @classmethod
    def for_plan(
        cls, recipe: Recipe, plan: Plan, *, backend: str, log: Callable[[str], None] | None = None
    ) -> PhasedRunner:
        """The runner for ``recipe`` on its ``plan``, with real engines of ``backend``."""
        from moa_local.config.registry import load_model_config
        from moa_local.engines import create_engine

        if recipe.aggregation == "chunked" and len(plan.phases) > 1:
            raise PlacementError(
                f"recipe '{recipe.name}' uses aggregation: chunked, which streams every layer at once, so all its "
                f"models must be resident; this plan needs {len(plan.phases)} phases. Use aggregation: full, or "
                "give the engines more memory."
            )

        def factory(model_id: str, options: EngineOptions) -> Engine:
            return create_engine(load_model_config(model_id), options=options, backend=backend)

        # vLLM-CPU engines load in their own processes on disjoint cores: at once. GPU engines profile the free
        # memory of their GPUs at start-up, and in-process backends import and load in this process: one by one.
        return cls(plan, factory=factory, options=planned_options(recipe, plan), log=log,
                   parallel=backend == "vllm" and plan.device == "cpu")

    # -- Runner -------------------------------------------------------------------------------------------------

    @property
    def resident_phase(self) -> int | None:
        return self._resident

    @property
    def engines(self) -> dict[str, Engine]:
        """The engines resident now."""
        return dict(self._pool.engines)

    def model_ids(self) -> list[str]:
        return list(self._phase_of)

    def submit(self, model_id: str, request: Request, *, on_done: OnDone, on_delta: OnDelta | None = None) -> Ticket:
        phase = self._phase_of.get(model_id)
        if phase is None:
            on_done(Generation.failed(f"no engine for model '{model_id}'; planned: {', '.join(self._phase_of)}",
                                      kind="engine_down"))
            return DONE_TICKET
        with self._cond:
            error: str | None
            if self._closed:
                error = "the engines are closed"
            elif phase == self._resident and not self._waiting:
                error = self._failed.get(model_id)
                if error is None:
                    return self._forward(model_id, request, on_done, on_delta)
            else:
                waiting = _Waiting(phase, model_id, request, on_done, on_delta)
                self._waiting.append(waiting)
                self._cond.notify_all()
                return Ticket(lambda: self._cancel_waiting(waiting))
        on_done(Generation.failed(error, kind="engine_down"))
        return DONE_TICKET

    def _forward(self, model_id: str, request: Request, on_done: OnDone, on_delta: OnDelta | None) -> Ticket:
        """Send to the resident engine (called with the lock held)."""
        self._in_flight += 1
        if self._resident is not None:
            self._note_run(self._resident)

        def done(gen: Generation) -> None:
            with self._cond:
                self._in_flight -= 1
                if self._in_flight == 0:
                    self._cond.notify_all()
            on_done(gen)

        return self._pool.submit(model_id, request, on_done=done, on_delta=on_delta)

    def _cancel_waiting(self, waiting: _Waiting) -> None:
        with self._cond:
            if waiting.ticket is None:
                waiting.cancelled = True
                if waiting in self._waiting:
                    self._waiting.remove(waiting)
                    self._cond.notify_all()
                ticket = None
            else:
                ticket = waiting.ticket
        if ticket is not None:
            ticket.cancel()
        elif waiting.cancelled:
            waiting.on_done(Generation.failed("request aborted", kind="aborted"))

    def health(self) -> dict[str, bool]:
        """Resident engines: alive or not (False when it could not start); sleeping engines: alive; engines of
        other phases are not loaded, which is expected (True)."""
        with self._cond:
            status = dict.fromkeys(self._phase_of, True)
            status.update(self._pool.health())
            status.update({m: e.is_alive() for m, e in self._asleep.items()})
            status.update(dict.fromkeys(self._failed, False))
            return status

    def usage(self) -> dict[str, dict[str, float | int]]:
        """Per model: requests, tokens and busy seconds so far (every engine it had)."""
        return self._pool.usage()

    def close(self) -> None:
        """Close every engine, resident or asleep, and fail what still waits. Idempotent."""
        with self._cond:
            self._closed = True
            waiting, self._waiting = list(self._waiting), deque()
            self._cond.notify_all()
        for w in waiting:
            w.on_done(Generation.failed("the engines were closed before this request ran", kind="engine_down"))
        if self._switcher is not None and self._switcher is not threading.current_thread():
            self._switcher.join(5.0)
        engines = [*reversed(list(self._pool.engines.items())), *self._asleep.items()]
        errors = close_engines(engines, on_closed=lambda m: self.stats.closes.update([m]))
        self._pool.engines.clear()
        self._asleep.clear()
        self._resident = None
        if errors:
            raise EngineDiedError("errors while closing engines: " + "; ".join(errors))

    # -- phases -------------------------------------------------------------------------------------------------

    def _switch_loop(self) -> None:
        """Swap when requests wait for another phase and nothing is in flight; then release them."""
        while True:
            with self._cond:
                while not self._closed and not (self._waiting and self._in_flight == 0):
                    self._cond.wait()
                if self._closed:
                    return
                phase = self._waiting[0].phase
            try:
                if phase != self._resident:
                    self._switch_to(phase)
            except Exception as exc:  # a swap that breaks fails the requests that waited for it
                self._log(f"could not swap to phase {phase}: {exc}")
                self._failed = dict.fromkeys(self.plan.phase_models(phase), f"swap to phase {phase} failed: {exc}")
                self._resident = phase
            failures: list[tuple[_Waiting, str]] = []
            with self._cond:
                keep: deque[_Waiting] = deque()
                for w in self._waiting:
                    if w.phase != phase:
                        keep.append(w)
                    elif w.model_id in self._failed:
                        failures.append((w, self._failed[w.model_id]))
                    else:
                        w.ticket = self._forward(w.model_id, w.request, w.on_done, w.on_delta)
                self._waiting = keep
                if self._waiting:
                    self._cond.notify_all()
            for w, error in failures:
                w.on_done(Generation.failed(error, kind="engine_down"))

    def _switch_to(self, phase: int) -> None:
        """Make ``phase`` resident (called with nothing in flight)."""
        if self._closed:
            raise EngineDiedError("the phased runner is closed")
        began = time.perf_counter()
        leaving = self._resident
        if leaving is not None:
            self._log(f"phase {leaving} → {phase}: swapping engines out ...")
            self._take_out()
        self._bring_in(phase)
        if leaving is not None:
            self.stats.swaps += 1
            self.stats.swap_s += time.perf_counter() - began

    def _take_out(self) -> None:
        """Sleep or close every resident engine (sleep: the plan says sleep1/sleep2 and the engine can)."""
        errors = []
        for model_id, engine in list(self._pool.engines.items()):
            level = SLEEP_LEVELS.get(self._swap_of.get(model_id, "reload"))
            sleep = getattr(engine, "sleep", None)
            try:
                if level is not None and callable(sleep) and engine.is_alive():
                    sleep(level)
                    self.stats.sleeps[model_id] += 1
                    self._asleep[model_id] = engine
                else:
                    engine.close()
                    self.stats.closes[model_id] += 1
            except Exception as exc:  # an engine that will not sleep is closed; it starts again when needed
                errors.append(f"{model_id}: {exc}")
                self._asleep.pop(model_id, None)
                try:
                    engine.close()
                finally:
                    self.stats.closes[model_id] += 1
        self._pool.engines.clear()
        self._resident = None
        if errors:
            self._log("while swapping out: " + "; ".join(errors))

    def _bring_in(self, phase: int) -> dict[str, str]:
        """Wake or start the engines of ``phase`` (at once when ``parallel``, else one after another). Returns
        {model id: error} for those that failed; their requests fail until the next swap."""
        self._failed = {}
        models = self.plan.phase_models(phase)
        errors: dict[str, Exception] = {}
        asleep = [m for m in models if m in self._asleep]
        for model_id in asleep:
            try:
                self._pool.engines[model_id] = self._wake(model_id)
            except MoaError as exc:
                errors[model_id] = exc
        cold = [m for m in models if m not in self._pool.engines and m not in errors]
        if self._parallel and len(cold) > 1:
            errors.update(self._pool.start_parallel(cold, self._start))
        else:
            for model_id in cold:
                try:
                    self._pool.add(model_id, self._start(model_id))
                except MoaError as exc:
                    errors[model_id] = exc
        for model_id, failure in errors.items():
            message = f"engine for '{model_id}' (phase {phase}) could not start: {failure}"
            self._failed[model_id] = message
            self.stats.start_errors.append(message)
            self._log(message)
        self._resident = phase
        return dict(self._failed)

    def _wake(self, model_id: str) -> Engine:
        engine = self._asleep.pop(model_id)
        try:
            engine.wake_up()  # type: ignore[attr-defined]
            self.stats.wakes[model_id] += 1
            return engine
        except Exception as exc:  # a sleeper that will not wake is replaced by a fresh engine
            self._log(f"engine for '{model_id}' did not wake ({exc}); starting it again")
            engine.close()
            self.stats.closes[model_id] += 1
        engine = self._start(model_id)
        self._pool.starts[model_id] = self._pool.starts.get(model_id, 0) + 1
        return engine

    def _start(self, model_id: str) -> Engine:
        self._log(f"starting engine for {model_id} (phase {self._phase_of[model_id]}) ...")
        try:
            engine = self._factory(model_id, self.options[model_id])
        except MoaError:
            raise
        except Exception as exc:  # a backend's own exception: still a start failure of this engine only
            raise EngineStartError(f"{type(exc).__name__}: {exc}") from exc
        self.stats.starts[model_id] += 1
        return engine

    def _note_run(self, phase: int) -> None:
        if not self.stats.phases_run or self.stats.phases_run[-1] != phase:
            self.stats.phases_run.append(phase)
