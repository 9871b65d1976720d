"""A pool of resident engines, one per model of a recipe: the LayerRunner for recipes whose models all fit at once.

Starts engines one after another (co-located vLLM engines profile memory at start-up and must not overlap), runs
each layer's per-model batches in parallel (one thread per engine: the engines do the batching), and closes every
engine on exit. Knows nothing about layers or references; the phased executor in placement/ is its sibling.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

from moa_local.config.recipe import Recipe
from moa_local.config.registry import load_model_config
from moa_local.engines import create_engine
from moa_local.engines.base import Engine, Generation, Request
from moa_local.errors import EngineDiedError, EngineError

EngineFactory = Callable[[str], Engine]


class EnginePool:
    """Owns one engine per model id. ``factory`` builds an engine for a model id (tests pass fakes)."""

    def __init__(self, model_ids: Sequence[str], *, factory: EngineFactory, log: Callable[[str], None] | None = None) -> None:
        self.engines: dict[str, Engine] = {}
        self._log = log or (lambda msg: print(msg, file=sys.stderr))
        try:
            for model_id in model_ids:
                self._log(f"starting engine for {model_id} ...")
                self.engines[model_id] = factory(model_id)
        except BaseException:
            self.close()
            raise

    @classmethod
    def for_recipe(cls, recipe: Recipe, *, backend: str, log: Callable[[str], None] | None = None) -> EnginePool:
        def factory(model_id: str) -> Engine:
            return create_engine(load_model_config(model_id), options=recipe.engine_options(model_id), backend=backend)

        return cls(recipe.model_ids(), factory=factory, log=log)

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
        with ThreadPoolExecutor(max_workers=len(batches), thread_name_prefix="moa-engine") as pool:
            futures = {m: pool.submit(one, m) for m in batches}
            return {m: f.result() for m, f in futures.items()}

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
