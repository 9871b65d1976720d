"""The Mixture-of-Agents pipeline: a recipe's conversations through its layers and aggregator, on a Runner.

Layer 1: every proposer answers every conversation. Layer k>1: every proposer answers again with the previous
layer's answers injected as references. The aggregator writes the final answer from the last layer. How requests
reach the engines is the scheduler's business (scheduler.py: flow for resident plans, stage for phased ones);
this module is the door the API, the eval and the chat use: ``run`` (a batch, results in input order) and
``stream`` (one conversation, the final answer as it is written).

Failures are never dropped: a failed request is retried ``policy.retries`` times, then recorded; a conversation
with fewer than ``policy.min_proposers`` answers in a layer stops with an error while the rest go on.
This module never imports a backend, the CLI or the server.
"""

from __future__ import annotations

import queue
from collections.abc import Iterator, Sequence
from dataclasses import replace

from moa_local.config.recipe import Recipe
from moa_local.engines.base import Runner
from moa_local.errors import ConversationFailed, EngineDiedError, EngineError, MoaError, PromptTooLongError
from moa_local.pipeline.chunked import ChunkedAggregation
from moa_local.pipeline.flow import FlowScheduler
from moa_local.pipeline.journal import Journal
from moa_local.pipeline.scheduler import (
    Conversation,
    Listener,
    RoleEvent,
    Schedule,
    choose_schedule,
    default_window,
    runner_phases,
)
from moa_local.pipeline.stage import StageScheduler
from moa_local.pipeline.trace import Result

LayerRunner = Runner
"""The engines' side of the pipeline (kept as a name: every Runner is one)."""

__all__ = ["Conversation", "LayerRunner", "MoAPipeline", "Streamed", "failure_error"]


def failure_error(result: Result) -> MoaError:
    """The moa-local error for a failed Result, by its kind (the server maps these to HTTP statuses)."""
    message = result.error or "the conversation failed"
    if result.kind == "too_long":
        return PromptTooLongError(message)
    if result.kind == "engine_down":
        return EngineDiedError(message)
    if result.kind in ("failed", "invalid", "aborted"):
        return EngineError(message)
    return ConversationFailed(message)


class Streamed:
    """One conversation running: iterate for the final answer's text as it is written; ``result()`` afterwards.
    Iteration raises the conversation's error (ConversationFailed, EngineError, ...) if it fails."""

    def __init__(self, scheduler: FlowScheduler, conversation: Conversation, listener: Listener | None) -> None:
        self._items: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._result: Result | None = None
        self._scheduler = scheduler
        self._conversation = conversation
        self._listener = listener
        self._handle = None

    def _on_event(self, event: RoleEvent) -> None:
        if event.aggregator and event.kind == "delta":
            self._items.put(event.delta)
        if self._listener is not None:
            self._listener(event)

    def __iter__(self) -> Iterator[str]:
        self._scheduler.start()
        self._handle = self._scheduler.submit(self._conversation, self._items.put, listener=self._on_event,
                                              watch="final")  # type: ignore[assignment]
        finished = False
        try:
            while True:
                item = self._items.get()
                if isinstance(item, Result):
                    finished = True
                    self._result = item
                    if not item.ok:
                        raise failure_error(item)
                    return
                yield item  # type: ignore[misc]
        finally:
            if not finished and self._handle is not None:
                self._handle.cancel()
            self._scheduler.close()

    def result(self) -> Result:
        if self._result is None:
            raise RuntimeError("the conversation has not finished; iterate the stream first")
        return self._result


class MoAPipeline:
    """Runs a recipe on a Runner. ``schedule``: flow or stage (default: flow when the recipe's models are resident
    together, else stage); ``window``: conversations in flight (flow; default from the engines' capacity)."""

    def __init__(self, recipe: Recipe, runner: Runner, *, schedule: Schedule | None = None,
                 window: int | None = None) -> None:
        self.recipe = recipe
        self.runner = runner
        self.schedule: Schedule = choose_schedule(recipe, runner, schedule)
        self.window = window or default_window(recipe, runner)
        self.proposers = recipe.proposer_roles()
        self.aggregator = recipe.aggregator_role()
        self.last_stage: StageScheduler | None = None
        """The stage scheduler of the last ``run`` under the stage schedule (its ``step_log``)."""

    def stage_window(self) -> int:
        """Requests in flight within a stage step: as many as the flow window's conversations would send."""
        return self.window * max(1, len(self.proposers))

    def run(self, conversations: Sequence[Conversation], *, listener: Listener | None = None) -> list[Result]:
        """Every conversation through all layers and the aggregator; results in the order given (ids may repeat)."""
        keyed = [Conversation(str(i), c.messages) for i, c in enumerate(conversations)]
        results: dict[int, Result] = {}
        relay = None
        if listener is not None:
            def relay(event: RoleEvent) -> None:
                listener(replace(event, conversation=conversations[int(event.conversation)].id))

        def keep(result: Result) -> None:
            results[int(result.id)] = result

        if self.schedule == "stage":
            phase_of, resident, _ = runner_phases(self.runner)
            stage = StageScheduler(self.recipe, self.runner, window=self.stage_window(), phase_of=phase_of,
                                   start_phase=resident)
            self.last_stage = stage
            journal = Journal(None, shape=stage.shape())
            try:
                stage.run(lambda: keyed, keep, journal=journal, listener=relay)
            finally:
                journal.close()
        else:
            FlowScheduler(self.recipe, self.runner, window=self.window).run(keyed, keep, listener=relay)
        out = []
        for i, conversation in enumerate(conversations):
            result = results[i]
            result.id = conversation.id
            out.append(result)
        return out

    def stream(self, conversation: Conversation, *, listener: Listener | None = None) -> Streamed:
        """Run one conversation; iterate the returned object for the aggregator's text as it is written.
        With ``aggregation: chunked`` every layer streams and the aggregator starts on first chunks."""
        if self.recipe.aggregation == "chunked":
            return ChunkedAggregation(self.recipe, self.runner, conversation, listener=listener)  # type: ignore[return-value]
        scheduler = FlowScheduler(self.recipe, self.runner, window=1)
        return Streamed(scheduler, conversation, listener)
