"""The scheduler's vocabulary and policy: what flows between the pipeline, its two schedules and their listeners,
how a request is built, when a failure is retried, when a layer has too few answers, and which schedule (and
window) a runner gets.

Two schedules feed a Runner every conversation's requests the moment they can run:

**flow** (flow.py; plans whose models are all resident): every conversation is its own small dataflow. Its layer-1
requests (one per proposer role) go out when it is admitted; its layer-k requests the moment all its layer-(k-1)
answers are in (or have failed for good); its aggregator request the moment its last layer is in. No barrier
between conversations; at most ``window`` conversations in flight, so memory is O(window), not O(job).

**stage** (stage.py; phased plans, or asked for): layer-at-a-time over the whole job, grouped by the phase of each
role's model, each step a barrier, so a phased runner swaps once per phase change whatever the job's size; every
finished response goes to a Journal (SQLite), so a killed job resumes without regenerating one.

Both: a request whose references made it too long for its engine goes again with them trimmed (trim.py: the rule, at
most MAX_TRIMS tries, recorded in its Response's ``trimmed``); a failed request is retried ``policy.retries`` times
unless its failure is deterministic (too long, invalid prompt); a conversation with fewer than ``min_proposers``
answers in a layer fails (Result.kind: the failures' common kind, else "too_few") while the others go on; a failed
aggregator fails the conversation with that request's kind. Listeners get RoleEvents (start, delta, done) per role.
Knows engines only through the Runner.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from moa_local.config.recipe import Recipe, Role
from moa_local.engines.base import Generation, Request, Runner
from moa_local.pipeline.trace import LayerTrace, Response, Result, Trimmed
from moa_local.prompts import Message, inject_references

Schedule = Literal["flow", "stage"]
Watch = Literal["none", "final", "all"]
"""Whose text a listener receives as it is written: nobody's, the aggregator's, or every role's."""

DETERMINISTIC = ("too_long", "invalid")
"""Error kinds a retry cannot fix: the same request fails the same way."""


@dataclass(frozen=True)
class Conversation:
    id: str
    messages: list[Message]


@dataclass(frozen=True)
class RoleEvent:
    """Something one role of one conversation did. ``layer`` is 1..layers, or layers + 1 for the aggregator."""

    kind: Literal["start", "delta", "done"]
    conversation: str
    layer: int
    role: str
    model: str
    aggregator: bool = False
    attempt: int = 1
    delta: str = ""
    response: Response | None = None


Listener = Callable[[RoleEvent], None]
OnResult = Callable[[Result], None]


def too_few(layer: int, responses: list[Response], min_proposers: int) -> str | None:
    """The failure message when fewer than ``min_proposers`` of a layer's responses succeeded, else None."""
    ok = sum(r.ok for r in responses)
    if ok >= min_proposers:
        return None
    errors = "; ".join(f"{r.role}: {r.error}" for r in responses if not r.ok)
    return (f"layer {layer}: only {ok} of {len(responses)} proposers answered "
            f"(min_proposers={min_proposers}): {errors}")


def failure_kind(responses: list[Response]) -> str:
    """The kind of a layer that had too few answers: its failures' kind when they all share one (every prompt too
    long, every engine down), else "too_few"."""
    kinds = {r.kind for r in responses if not r.ok}
    only = kinds.pop() if len(kinds) == 1 else None
    return only if only is not None else "too_few"


def build_request(conv: Conversation, role: Role, references: list[str], *, stage: str,
                  prefix: str = "", budget_used: int = 0) -> Request:
    """The request ``role`` sends: the conversation with ``references`` injected (none in layer 1); with a
    ``prefix`` it continues an answer already partly written (``budget_used`` tokens of it)."""
    messages = inject_references(conv.messages, references, system_prompt=role.system_prompt)
    sampling = role.sampling
    if prefix:
        messages.append({"role": "assistant", "content": prefix})
        sampling = sampling.model_copy(update={"max_tokens": max(1, sampling.max_tokens - budget_used)})
    return Request(messages=messages, sampling=sampling, request_id=f"{conv.id}/{stage}/{role.name}")


def to_response(role: Role, gen: Generation, attempts: int, *, trimmed: Trimmed | None = None) -> Response:
    return Response(role=str(role.name), model=role.model, text=gen.text if gen.ok else None, error=gen.error,
                    usage=gen.usage, seconds=gen.seconds, attempts=attempts, kind=gen.kind if not gen.ok else None,
                    trimmed=trimmed)


def references_of(layer: LayerTrace | None) -> list[str]:
    if layer is None:
        return []
    return [r.text for r in layer.responses if r.ok and r.text is not None]


def retryable(gen: Generation, attempt: int, retries: int) -> bool:
    return not gen.ok and gen.kind not in (*DETERMINISTIC, "aborted") and attempt <= retries


def runner_phases(runner: Runner) -> tuple[Callable[[str], int], int, int]:
    """(phase of a model, the resident phase, how many phases) for ``runner`` (one phase when it does not say)."""
    plan = getattr(runner, "plan", None)
    if plan is None or not getattr(plan, "phases", None):
        return (lambda _m: 0), 0, 1
    phase_of = {e.id: e.phase for e in plan.models}
    resident = getattr(runner, "resident_phase", None)
    return (lambda m: phase_of.get(m, 0)), (resident if resident is not None else 0), len(plan.phases)


def choose_schedule(recipe: Recipe, runner: Runner, requested: Schedule | None = None) -> Schedule:
    """flow when every model of ``recipe`` lives in one phase of the runner, else stage (or what was asked)."""
    if requested is not None:
        return requested
    phase_of, _, count = runner_phases(runner)
    return "flow" if count == 1 or len({phase_of(m) for m in recipe.model_ids()}) == 1 else "stage"


PROMPT_ESTIMATE_TOKENS = 256
"""A conversation's own tokens (system prompt and turns) assumed when sizing the window."""

MAX_NUM_SEQS = 256
"""vLLM's default cap on the sequences an engine runs at once (CPU and most GPUs)."""


def default_window(recipe: Recipe, runner: Runner) -> int:
    """Conversations in flight under flow: enough to keep every engine's running batch full, twice over (some
    conversations always wait on another engine). An engine's batch: the sequences its planned KV cache holds at
    this recipe's lengths (PROMPT_ESTIMATE_TOKENS + the references + its roles' answer budget), at most
    MAX_NUM_SEQS; 64 when the runner has no plan with KV numbers. A conversation puts as many requests on an
    engine at once as it has proposer roles there."""
    plan = getattr(runner, "plan", None)
    proposers = recipe.proposer_roles()
    references = sum(r.sampling.max_tokens for r in proposers)
    need = 1
    for model in recipe.model_ids():
        roles = [r for r in [*proposers, recipe.aggregator_role()] if r.model == model]
        sequence = PROMPT_ESTIMATE_TOKENS + references + max(r.sampling.max_tokens for r in roles)
        kv = 0
        if plan is not None and getattr(plan, "device", "none") != "none":
            try:
                kv = plan.engine(model).kv_tokens
            except KeyError:
                kv = 0
        capacity = min(MAX_NUM_SEQS, kv // sequence) if kv else 64
        per_conversation = max(1, sum(1 for r in proposers if r.model == model))
        need = max(need, math.ceil(max(1, capacity) / per_conversation))
    return max(8, min(4096, 2 * need))
