"""The phased executor: runs the pipeline under a Plan whose engines do not all fit at once.

Owns three things:
  ``start_runner(recipe, plan, backend=...)`` — the resident EnginePool for a one-phase plan, else a PhasedRunner.
  ``planned_options(recipe, plan)`` — each engine's EngineOptions: the recipe's, updated with what the plan decided
  (max_model_len, tensor_parallel_size, gpu_memory_utilization, cpu_threads, cpu_kvcache_gib) wherever the recipe
  did not set the value itself. Used for resident pools too, so the plan's decisions always reach the engines.
  ``PhasedRunner`` — a LayerRunner (``run``, ``stream``, ``health``, ``close``). A layer's per-model batches are
  grouped by the plan's phases; the phase already resident runs first, then the runner swaps to the next one and
  runs its whole share, and so on. A batch job therefore sends every conversation through one phase's models before
  the engines swap: each model loads at most once per layer (never once per prompt), and the last phase of a layer
  is the first of the next. Swapping: an engine the plan puts to sleep (``sleep1``/``sleep2``, GPU only) is sent
  ``sleep(level)`` and later ``wake_up()`` when it has those methods; every other engine is closed and started
  again (CPU: vLLM sleep mode is CUDA-only). The leaving phase is out before the next one starts, so a memory budget
  that holds one phase is enough. An engine that fails to start fails its own requests (recorded errors; the
  pipeline's failure policy decides), never the whole batch. ``stats`` counts starts, closes, sleeps, wakes, swaps
  and swap seconds (scripts/bench_phases.py reports them).

With the whole plan in one phase it is the resident EnginePool: every engine starts in ``__init__`` (a start failure
raises, as the pool's does), batches run in parallel through ``EnginePool.run``, nothing ever swaps.

Never plans (planner.py does), never imports a backend (the factory builds engines), never knows about layers or
references: it sees only per-model batches, like every LayerRunner.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from moa_local.config.recipe import EngineOptions, Recipe
from moa_local.engines.base import Engine, Generation, Request
from moa_local.engines.pool import EnginePool
from moa_local.errors import EngineDiedError, EngineError, EngineStartError, MoaError, PlacementError
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


def start_runner(
    recipe: Recipe, plan: Plan, *, backend: str, log: Callable[[str], None] | None = None
) -> EnginePool | PhasedRunner:
    """Start ``recipe``'s engines as ``plan`` says: the resident EnginePool for one phase, else the PhasedRunner;
    either way with the plan's per-engine options. The fake backend keeps the recipe's options."""
    if len(plan.phases) > 1:
        return PhasedRunner.for_plan(recipe, plan, backend=backend, log=log)
    return EnginePool.for_recipe(recipe, backend=backend, log=log, options=planned_options(recipe, plan))


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


class PhasedRunner:
    """Runs per-model batches phase by phase under ``plan``. ``factory(model_id, options)`` starts one engine;
    ``options`` are the per-model EngineOptions (``planned_options(recipe, plan)`` for real engines)."""

    def __init__(
        self,
        plan: Plan,
        *,
        factory: EngineFactory,
        options: Mapping[str, EngineOptions],
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.plan = plan
        self.options = dict(options)
        self.stats = PhaseStats()
        self._factory = factory
        self._log = log or (lambda msg: print(msg, file=sys.stderr))
        self._phase_of = {e.id: e.phase for e in plan.models}
        self._swap_of = {e.id: e.swap for e in plan.models}
        self._pool = EnginePool([], factory=self._start, log=self._log)
        self._asleep: dict[str, Engine] = {}
        self._resident: int | None = None
        self._lock = threading.RLock()
        self._idle = threading.Condition(self._lock)
        self._streams: Counter[int] = Counter()
        """Open streams per thread id: a swap waits until none is open."""
        self._closed = False
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

        return cls(plan, factory=factory, options=planned_options(recipe, plan), log=log)

    # -- LayerRunner --------------------------------------------------------------------------------------------

    @property
    def resident_phase(self) -> int | None:
        return self._resident

    @property
    def engines(self) -> dict[str, Engine]:
        """The engines resident now."""
        return dict(self._pool.engines)

    def run(self, batches: dict[str, list[Request]]) -> dict[str, list[Generation]]:
        """Every model's batch, phase by phase: the resident phase first, then the nearest others."""
        out: dict[str, list[Generation]] = {}
        by_phase: dict[int, dict[str, list[Request]]] = {}
        for model_id, requests in batches.items():
            phase = self._phase_of.get(model_id)
            if phase is None:
                known = ", ".join(self._phase_of)
                out[model_id] = [Generation.failed(f"no engine for model '{model_id}'; planned: {known}")
                                 for _ in requests]
            else:
                by_phase.setdefault(phase, {})[model_id] = requests
        with self._lock:
            for phase in self.phase_order(by_phase):
                share = by_phase[phase]
                failed = self._switch_to(phase)
                for model_id, error in failed.items():
                    if model_id in share:
                        out[model_id] = [Generation.failed(error) for _ in share.pop(model_id)]
                if share:
                    self._note_run(phase)
                    out.update(self._pool.run(share))
        return {m: out[m] for m in batches}

    def stream(self, model_id: str, request: Request) -> Iterator[str]:
        """Bring the model's phase in (now), then stream from its engine. Swaps wait until open streams end."""
        phase = self._phase_of.get(model_id)
        if phase is None:
            raise EngineError(f"no engine for model '{model_id}'; planned: {', '.join(self._phase_of)}")
        with self._lock:
            failed = self._switch_to(phase)
            if model_id in failed:
                raise EngineStartError(failed[model_id])
            self._note_run(phase)
            deltas = self._pool.stream(model_id, request)
            owner = threading.get_ident()
            self._streams[owner] += 1
        return self._release_after(deltas, owner)

    def health(self) -> dict[str, bool]:
        """Resident engines: alive or not; sleeping engines: alive; engines of other phases are not loaded, which
        is expected (True)."""
        with self._lock:
            status = dict.fromkeys(self._phase_of, True)
            status.update(self._pool.health())
            status.update({m: e.is_alive() for m, e in self._asleep.items()})
            return status

    def close(self) -> None:
        """Close every engine, resident or asleep. Idempotent."""
        with self._lock:
            self._closed = True
            errors: list[str] = []
            for model_id, engine in [*reversed(list(self._pool.engines.items())), *self._asleep.items()]:
                try:
                    engine.close()
                    self.stats.closes[model_id] += 1
                except Exception as exc:  # close the others anyway; report below
                    errors.append(f"{model_id}: {exc}")
            self._pool.engines.clear()
            self._asleep.clear()
            self._resident = None
            if errors:
                raise EngineDiedError("errors while closing engines: " + "; ".join(errors))

    def __enter__(self) -> PhasedRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- phases -------------------------------------------------------------------------------------------------

    def phase_order(self, phases: Mapping[int, object]) -> list[int]:
        """The phases to visit for one call: the resident one first, then by distance from it in the plan's phase
        order (so layers snake 0→1→2, 2→1→0, and the last phase of a layer is the first of the next); with none
        resident, from the first scheduled phase."""
        start = self._resident
        if start is None:
            start = self.plan.schedule[0].phase if self.plan.schedule else 0
        return sorted(phases, key=lambda p: (abs(p - start), p))

    def _switch_to(self, phase: int) -> dict[str, str]:
        """Make ``phase`` resident. Returns {model id: error} for its engines that could not start."""
        if self._closed:
            raise EngineDiedError("the phased runner is closed")
        if self._resident == phase:
            missing = [m for m in self.plan.phase_models(phase) if m not in self._pool.engines]
            return self._bring_in(phase, only=missing) if missing else {}
        if self._streams[threading.get_ident()]:
            raise EngineError(
                f"cannot swap to phase {phase} while this thread still reads a stream from phase {self._resident}; "
                "finish or close the stream first"
            )
        while +self._streams:  # another thread still reads a stream from the resident phase
            self._idle.wait()
        began = time.perf_counter()
        leaving = self._resident
        if leaving is not None:
            self._log(f"phase {leaving} → {phase}: swapping engines out ...")
            self._take_out()
        failed = self._bring_in(phase)
        if leaving is not None:
            self.stats.swaps += 1
            self.stats.swap_s += time.perf_counter() - began
        return failed

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

    def _bring_in(self, phase: int, *, only: list[str] | None = None) -> dict[str, str]:
        """Wake or start the engines of ``phase`` one after another (co-located vLLM engines profile memory at
        start and must not overlap). Returns {model id: error} for those that failed."""
        self._resident = phase
        failed: dict[str, str] = {}
        for model_id in only if only is not None else self.plan.phase_models(phase):
            try:
                self._pool.engines[model_id] = self._wake_or_start(model_id)
            except MoaError as exc:
                message = f"engine for '{model_id}' (phase {phase}) could not start: {exc}"
                failed[model_id] = message
                self.stats.start_errors.append(message)
                self._log(message)
        return failed

    def _wake_or_start(self, model_id: str) -> Engine:
        engine = self._asleep.pop(model_id, None)
        if engine is not None:
            try:
                engine.wake_up()  # type: ignore[attr-defined]
                self.stats.wakes[model_id] += 1
                return engine
            except Exception as exc:  # a sleeper that will not wake is replaced by a fresh engine
                self._log(f"engine for '{model_id}' did not wake ({exc}); starting it again")
                engine.close()
                self.stats.closes[model_id] += 1
        return self._start(model_id)

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

    def _release_after(self, deltas: Iterator[str], owner: int) -> Iterator[str]:
        try:
            yield from deltas
        finally:
            with self._lock:
                self._streams[owner] -= 1
                self._idle.notify_all()
