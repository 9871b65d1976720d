"""The stage schedule: layer at a time over the whole job, one phase at a time, with a durable journal.

Steps (``steps_for``): layer 1 on the first phase's models for every conversation, then the next phase's, ...,
snaking so a layer's last phase is the next layer's first; the aggregator last. Each step reads the job's
conversations again from its source, sends each one's requests for the step's roles (at most ``window`` in
flight), and waits for all of them: a barrier, so a phased runner swaps exactly once per phase change of the
schedule whatever the job's size. Every finished response goes to the Journal and is read back when the
conversation's next step runs, so memory stays O(window) and a killed job resumes without regenerating any
journaled response. A conversation whose previous layer has too few answers ends at the next step; one whose
aggregator answered ends with its Result, and its journal rows go.
"""

from __future__ import annotations

import itertools
import queue
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from moa_local.config.recipe import Recipe, Role
from moa_local.engines.base import Generation, Runner, Ticket
from moa_local.pipeline.journal import Journal
from moa_local.pipeline.scheduler import (
    Conversation,
    Listener,
    OnResult,
    RoleEvent,
    build_request,
    failure_kind,
    retryable,
    to_response,
    too_few,
)
from moa_local.pipeline.trace import LayerTrace, Result
from moa_local.pipeline.trim import ReferenceTrim


def steps_for(recipe: Recipe, phase_of: Callable[[str], int], *, start: int = 0) -> list[tuple[int, list[Role]]]:
    """The stage schedule: (layer, roles) steps; within a layer, roles grouped by their model's phase, the phases
    visited in a snake (forward in odd layers from ``start``, backward in even ones) so a layer's last phase is the
    next layer's first; the aggregator last."""
    proposers = recipe.proposer_roles()
    phases = sorted({phase_of(r.model) for r in proposers}, key=lambda p: (p != start, p))
    steps: list[tuple[int, list[Role]]] = []
    for layer in range(1, recipe.layers + 1):
        order = phases if layer % 2 == 1 else list(reversed(phases))
        for phase in order:
            steps.append((layer, [r for r in proposers if phase_of(r.model) == phase]))
    steps.append((recipe.layers + 1, [recipe.aggregator_role()]))
    return steps


@dataclass
class _StepState:
    in_flight: int = 0
    done: queue.SimpleQueue[tuple[Any, ...]] = field(default_factory=queue.SimpleQueue)


class StageScheduler:
    """The stage schedule over ``runner`` for ``recipe``: step by step over the whole job (see the module doc).
    ``window``: requests in flight at once within a step."""

    def __init__(self, recipe: Recipe, runner: Runner, *, window: int = 256,
                 phase_of: Callable[[str], int] | None = None, start_phase: int = 0) -> None:
        self.recipe = recipe
        self.runner = runner
        self.window = max(1, window)
        self.steps = steps_for(recipe, phase_of or (lambda _m: 0), start=start_phase)
        self.step_log: list[dict[str, Any]] = []
        """Per step: layer, roles, requests sent, seconds (benchmarks and the batch summary read it)."""

    def shape(self) -> dict[str, Any]:
        """What a journal of this schedule must match."""
        return {"recipe": self.recipe.name, "layers": self.recipe.layers, "schedule": "stage",
                "roles": [str(r.name) for r in self.recipe.proposer_roles()], "aggregator": str(self.recipe.aggregator_role().name)}

    def run(self, source: Callable[[], Iterable[Conversation]], on_result: OnResult, *, journal: Journal,
            progress: Callable[[str, int], None] | None = None, listener: Listener | None = None) -> None:
        """Run every step over ``source()`` (called once per step: the job is read again, never held). Results go
        to ``on_result`` (this thread) as each conversation ends; its journal rows are dropped after."""
        for number, (layer, roles) in enumerate(self.steps, start=1):
            label = (f"layer {layer}/{self.recipe.layers}" if layer <= self.recipe.layers else "aggregator") + \
                f" [{', '.join(str(r.name) for r in roles)}]"
            began = time.perf_counter()
            step_progress: Callable[[int], None] | None = None
            if progress is not None:
                def step_progress(n: int, _label: str = label) -> None:
                    progress(_label, n)

            sent = self._run_step(layer, roles, source(), on_result, journal, progress=step_progress,
                                  listener=listener)
            self.step_log.append({"step": number, "layer": layer, "roles": [str(r.name) for r in roles],
                                  "requests": sent, "seconds": round(time.perf_counter() - began, 3)})

    def _run_step(self, layer: int, roles: list[Role], conversations: Iterable[Conversation], on_result: OnResult,
                  journal: Journal, *, progress: Callable[[int], None] | None, listener: Listener | None) -> int:
        aggregator = layer > self.recipe.layers
        policy = self.recipe.policy
        state = _StepState()
        tickets: dict[int, Ticket] = {}
        keys = itertools.count()
        sent = 0

        def submit(conv: Conversation, role: Role, trim: ReferenceTrim, attempt: int) -> None:
            key = next(keys)
            request = build_request(conv, role, trim.references, stage=f"L{layer}" if not aggregator else "agg")
            trim.sent(request.messages)
            state.in_flight += 1
            if listener is not None:
                listener(RoleEvent("start", conv.id, layer, str(role.name), role.model, aggregator, attempt))

            def on_done(gen: Generation) -> None:
                state.done.put((key, conv, role, trim, attempt, gen))

            tickets[key] = self.runner.submit(role.model, request, on_done=on_done)

        def handle(item: tuple[Any, ...]) -> None:
            key, conv, role, trim, attempt, gen = item
            state.in_flight -= 1
            tickets.pop(key, None)
            if trim.retry(gen):  # its references made it too long: again with them trimmed
                submit(conv, role, trim, attempt)
                return
            if retryable(gen, attempt, policy.retries):
                submit(conv, role, trim, attempt + 1)
                return
            response = to_response(role, trim.explain(gen), attempt, trimmed=trim.record())
            journal.put(conv.id, layer, response)
            if listener is not None:
                listener(RoleEvent("done", conv.id, layer, response.role, response.model, aggregator, attempt,
                                   response=response))
            if aggregator:
                self._emit(conv, journal, on_result)
            if progress is not None:
                progress(1)

        def drain(limit: int) -> None:
            while state.in_flight > limit:
                try:
                    handle(state.done.get(timeout=0.5))
                except queue.Empty:
                    continue

        try:
            for conv in conversations:
                if journal.is_finished(conv.id):
                    continue
                done = journal.layers(conv.id)
                if layer > 1:
                    previous = done.get(layer - 1, {})
                    trace = [previous[str(r.name)] for r in self.recipe.proposer_roles() if str(r.name) in previous]
                    why = too_few(layer - 1, trace, policy.min_proposers)
                    if why is not None:
                        self._emit(conv, journal, on_result, error=why, kind=failure_kind(trace))
                        continue
                    references = [r.text for r in trace if r.ok and r.text is not None]
                else:
                    references = []
                todo = [r for r in roles if str(r.name) not in done.get(layer, {})]
                if aggregator and not todo:  # answered before a kill, not yet handed on
                    self._emit(conv, journal, on_result)
                    continue
                for role in todo:
                    drain(self.window - 1)
                    submit(conv, role, ReferenceTrim(references), 1)
                    sent += 1
            drain(0)
        except BaseException:
            for ticket in list(tickets.values()):
                ticket.cancel()
            raise
        return sent

    def _emit(self, conv: Conversation, journal: Journal, on_result: OnResult, *, error: str | None = None,
              kind: str | None = None) -> None:
        """Hand on the Result of ``conv`` from its journal rows, then mark it finished."""
        rows = journal.layers(conv.id)
        layers = []
        for index in range(1, self.recipe.layers + 1):
            if index not in rows:
                break
            layers.append(LayerTrace(index=index, responses=[rows[index][str(r.name)] for r in self.recipe.proposer_roles()
                                                             if str(r.name) in rows[index]]))
        agg = rows.get(self.recipe.layers + 1, {}).get(str(self.recipe.aggregator_role().name))
        if error is None and agg is not None and not agg.ok:
            error, kind = f"aggregator '{agg.role}' failed: {agg.error}", agg.kind or "failed"
        seconds = sum(r.seconds for layer in layers for r in layer.responses) + (agg.seconds if agg else 0.0)
        result = Result(id=conv.id, output=agg.text if agg is not None and error is None else None, error=error,
                        layers=layers, aggregator=agg, seconds=seconds, kind=kind)
        on_result(result)
        journal.finish(conv.id)
