"""The Mixture-of-Agents pipeline, batch first: a list of conversations goes through the layers together.

Layer 1: every proposer answers every conversation. Layer k>1: every proposer answers again with the previous
layer's answers injected as references. The aggregator writes the final answer from the last layer. Each layer is
ONE batch of (conversations x proposers) requests handed to the runner, which owns the engines.

Failures are never dropped: a failed request is retried `policy.retries` times, then recorded; a conversation
with fewer than `policy.min_proposers` answers in a layer stops with an error while the rest of the batch goes on.
This module never imports a backend, the CLI or the server.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from moa_local.config.recipe import Recipe, Role
from moa_local.engines.base import Generation, Request
from moa_local.errors import ConversationFailed, EngineError
from moa_local.pipeline.trace import LayerTrace, Response, Result
from moa_local.prompts import Message, inject_references


class LayerRunner(Protocol):
    """Runs one stage's requests, grouped by model id. Owns the engines (resident, phased, or remote)."""

    def run(self, batches: dict[str, list[Request]]) -> dict[str, list[Generation]]: ...

    def stream(self, model_id: str, request: Request) -> Iterator[str]: ...


@dataclass(frozen=True)
class Conversation:
    id: str
    messages: list[Message]


# Progress callback: (stage, done, total); stage is "layer 1/2", ..., "aggregator".
Progress = Callable[[str, int, int], None]


@dataclass
class _State:
    conv: Conversation
    layers: list[LayerTrace] = field(default_factory=list)
    error: str | None = None
    started: float = field(default_factory=time.perf_counter)

    def references(self) -> list[str]:
        if not self.layers:
            return []
        return [r.text for r in self.layers[-1].responses if r.ok and r.text is not None]


class MoAPipeline:
    """Runs a recipe's layers on a LayerRunner."""

    def __init__(self, recipe: Recipe, runner: LayerRunner) -> None:
        self.recipe = recipe
        self.runner = runner
        self.proposers = recipe.proposer_roles()
        self.aggregator = recipe.aggregator_role()

    # -- the public entry points ------------------------------------------------------------------------------

    def run(self, conversations: Sequence[Conversation], *, progress: Progress | None = None) -> list[Result]:
        """Run every conversation through all layers and the aggregator, as batches."""
        states = [_State(c) for c in conversations]
        self.run_layers(states, progress=progress)
        finals = self._run_roles(
            [(s, self.aggregator) for s in states if s.error is None], layer=None, progress=progress
        )
        results = []
        for state in states:
            agg = finals.get(id(state))
            if state.error is None and agg is not None and not agg.ok:
                state.error = f"aggregator '{self.aggregator.name}' failed: {agg.error}"
            results.append(
                Result(
                    id=state.conv.id,
                    output=agg.text if (agg is not None and agg.ok and state.error is None) else None,
                    error=state.error,
                    layers=state.layers,
                    aggregator=agg,
                    seconds=time.perf_counter() - state.started,
                )
            )
        return results

    def stream(self, conversation: Conversation, *, progress: Progress | None = None) -> tuple[_State, Iterator[str]]:
        """Run the layers for one conversation, then stream the aggregator's answer as text deltas.

        Raises ConversationFailed when the layers leave too few references."""
        if self.recipe.aggregation == "chunked":  # every layer streams; the aggregator starts on first chunks
            from moa_local.pipeline.chunked import ChunkedAggregation

            chunked = ChunkedAggregation(self, conversation, progress=progress)
            return chunked.state, chunked.deltas()
        state = _State(conversation)
        self.run_layers([state], progress=progress)
        if state.error:
            raise ConversationFailed(state.error)
        request = self.aggregator_request(state)
        return state, self.runner.stream(self.aggregator.model, request)

    # -- layers -----------------------------------------------------------------------------------------------

    def run_layers(self, states: list[_State], *, progress: Progress | None = None) -> None:
        for index in range(1, self.recipe.layers + 1):
            alive = [s for s in states if s.error is None]
            if not alive:
                return
            answers = self._run_roles([(s, r) for s in alive for r in self.proposers], layer=index, progress=progress)
            for state in alive:
                trace = LayerTrace(index=index, responses=[answers[id(state), r.name] for r in self.proposers])
                state.layers.append(trace)
                ok = sum(r.ok for r in trace.responses)
                if ok < self.recipe.policy.min_proposers:
                    errors = "; ".join(f"{r.role}: {r.error}" for r in trace.responses if not r.ok)
                    state.error = (
                        f"layer {index}: only {ok} of {len(trace.responses)} proposers answered "
                        f"(min_proposers={self.recipe.policy.min_proposers}): {errors}"
                    )

    def request_for(self, state: _State, role: Role, layer: int | None) -> Request:
        messages = inject_references(state.conv.messages, state.references(), system_prompt=role.system_prompt)
        stage = f"L{layer}" if layer is not None else "agg"
        return Request(messages=messages, sampling=role.sampling, request_id=f"{state.conv.id}/{stage}/{role.name}")

    def aggregator_request(self, state: _State) -> Request:
        return self.request_for(state, self.aggregator, None)

    def _run_roles(self, pairs: list[tuple[_State, Role]], *, layer: int | None, progress: Progress | None) -> dict:
        """Run (state, role) pairs as one batch per model, retrying failures; returns Responses keyed by
        (id(state), role.name) for layers or id(state) for the aggregator."""
        stage = f"layer {layer}/{self.recipe.layers}" if layer is not None else "aggregator"
        todo = list(range(len(pairs)))
        done: dict[int, Response] = {}
        if progress:
            progress(stage, 0, len(pairs))
        for attempt in range(self.recipe.policy.retries + 1):
            batches: dict[str, list[Request]] = {}
            owners: dict[str, list[int]] = {}
            for n in todo:
                state, role = pairs[n]
                batches.setdefault(role.model, []).append(self.request_for(state, role, layer))
                owners.setdefault(role.model, []).append(n)
            if not batches:
                break
            outputs = self._safe_run(batches)
            for model, gens in outputs.items():
                for n, gen in zip(owners[model], gens, strict=True):
                    _, role = pairs[n]
                    done[n] = Response(
                        role=role.name or role.model,
                        model=role.model,
                        text=gen.text if gen.ok else None,
                        error=gen.error,
                        usage=gen.usage,
                        seconds=gen.seconds,
                        attempts=attempt + 1,
                    )
            todo = [n for n in todo if not done[n].ok]
            if progress:
                progress(stage, len(pairs) - len(todo), len(pairs))
            if not todo:
                break
        if layer is None:
            return {id(pairs[n][0]): r for n, r in done.items()}
        return {(id(pairs[n][0]), pairs[n][1].name): r for n, r in done.items()}

    def _safe_run(self, batches: dict[str, list[Request]]) -> dict[str, list[Generation]]:
        """The runner's answers; an engine-level error becomes a failed Generation for each of its requests."""
        try:
            outputs = self.runner.run(batches)
        except EngineError as exc:
            return {model: [Generation.failed(str(exc)) for _ in reqs] for model, reqs in batches.items()}
        for model, reqs in batches.items():
            gens = outputs.get(model)
            if gens is None or len(gens) != len(reqs):
                outputs[model] = [Generation.failed(f"engine '{model}' returned no answer") for _ in reqs]
        return outputs
