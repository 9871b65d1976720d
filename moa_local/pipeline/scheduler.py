"""The scheduler: feeds a Runner every conversation's requests the moment they can run. Two schedules.

**flow** (plans whose models are all resident): every conversation is its own small dataflow. Its layer-1 requests
(one per proposer role) go out when it is admitted; its layer-k requests the moment all its layer-(k-1) answers
are in (or have failed for good); its aggregator request the moment its last layer is in. No barrier between
conversations: while one waits for a slow engine, others keep the fast one busy. At most ``window`` conversations
are in flight (the rest wait unread in their source), so memory is O(window), not O(job). Results come back in the
order they finish. ``run`` drives a whole source in the calling thread; ``start`` + ``submit`` serve a stream of
conversations (the HTTP server) from a background thread.

**stage** (phased plans, or asked for): layer-at-a-time over the whole job, grouped by the phase of each role's
model: step 1 is layer 1 on the first phase's models for every conversation, then the next phase, ... then the
aggregator. Each step waits for the previous one (a barrier), so a phased runner swaps once per phase change,
whatever the job's size. Every finished response goes to a Journal (SQLite), read back when the conversation's
next step runs, so memory stays O(window) and a killed job resumes without regenerating a finished response.

Both: a failed request is retried ``policy.retries`` times unless its failure is deterministic (too long, invalid
prompt); a conversation with fewer than ``min_proposers`` answers in a layer fails (Result.kind "too_few") while
the others go on; a failed aggregator fails the conversation with that request's error kind. Listeners get
RoleEvents (start, delta, done) per role: ``watch`` says whose text streams ("final": the aggregator's; "all":
every role's). A streamed aggregator that is retried continues the text already sent (assistant prefix, the rest
of its token budget). Knows engines only through the Runner; never touches files other than the journal.
"""

from __future__ import annotations

import itertools
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from moa_local.config.recipe import Recipe, Role
from moa_local.engines.base import Generation, Request, Runner, Ticket, Usage
from moa_local.errors import EngineDiedError, ServerBusy
from moa_local.pipeline.journal import Journal
from moa_local.pipeline.trace import LayerTrace, Response, Result
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


def to_response(role: Role, gen: Generation, attempts: int) -> Response:
    return Response(role=str(role.name), model=role.model, text=gen.text if gen.ok else None, error=gen.error,
                    usage=gen.usage, seconds=gen.seconds, attempts=attempts, kind=gen.kind if not gen.ok else None)


def references_of(layer: LayerTrace | None) -> list[str]:
    if layer is None:
        return []
    return [r.text for r in layer.responses if r.ok and r.text is not None]


def retryable(gen: Generation, attempt: int, retries: int) -> bool:
    return not gen.ok and gen.kind not in (*DETERMINISTIC, "aborted") and attempt <= retries


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


# -- flow ---------------------------------------------------------------------------------------------------------


class _Flight:
    """One conversation in flight under the flow schedule. Touched only by the scheduler's loop thread, except
    ``written`` (the aggregator's streamed text), appended to by the engine thread that streams it."""

    __slots__ = ("conv", "recipe", "proposers", "aggregator", "on_result", "listener", "watch", "layers", "stage",
                 "responses", "attempts", "open", "tickets", "started", "finished", "written", "counted")

    def __init__(self, conv: Conversation, recipe: Recipe, *, on_result: OnResult, listener: Listener | None,
                 watch: Watch) -> None:
        self.conv = conv
        self.recipe = recipe
        self.proposers = recipe.proposer_roles()
        self.aggregator = recipe.aggregator_role()
        self.on_result = on_result
        self.listener = listener
        self.watch = watch
        self.layers: list[LayerTrace] = []
        self.stage = 0
        self.responses: list[Response | None] = []
        self.attempts: list[int] = []
        self.open = 0
        self.tickets: list[Ticket | None] = []
        self.started = time.perf_counter()
        self.finished = False
        self.written = ""
        self.counted = 0

    def roles(self, stage: int) -> list[Role]:
        return self.proposers if stage <= self.recipe.layers else [self.aggregator]


class Handle:
    """A conversation submitted to a serving FlowScheduler: ``cancel()`` abandons it (its on_result gets a Result
    of kind "aborted" unless it had finished)."""

    def __init__(self, scheduler: FlowScheduler, flight: _Flight) -> None:
        self._scheduler = scheduler
        self._flight = flight

    def cancel(self) -> None:
        self._scheduler._post(("cancel", self._flight))


class FlowScheduler:
    """The flow schedule over ``runner`` for ``recipe``. ``window``: conversations in flight at once;
    ``max_queue`` (serving): conversations that may wait for the window before ``submit`` refuses (ServerBusy)."""

    def __init__(self, recipe: Recipe, runner: Runner, *, window: int = 64, max_queue: int = 0) -> None:
        self.recipe = recipe
        self.runner = runner
        self.window = max(1, window)
        self.max_queue = max(0, max_queue)
        self._events: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._active = 0
        self._queued: deque[_Flight] = deque()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False

    # -- batch: drive a whole source in this thread ----------------------------------------------------------

    def run(self, conversations: Iterable[Conversation], on_result: OnResult, *, listener: Listener | None = None,
            watch: Watch = "none", commit: Callable[[], None] | None = None) -> None:
        """Send every conversation through the recipe; ``on_result`` gets each Result as it finishes (from this
        thread). ``commit`` runs after each burst of results (the batch writer's fsync). Reads the source only as
        the window frees up. On an exception (Ctrl-C) every request in flight is cancelled before it propagates."""
        source: Iterator[Conversation] | None = iter(conversations)
        flights: set[_Flight] = set()

        def done(result: Result, _flight: _Flight) -> None:
            flights.discard(_flight)
            on_result(result)

        try:
            while True:
                while source is not None and len(flights) < self.window:
                    conv = next(source, None)
                    if conv is None:
                        source = None
                        break
                    flight = _Flight(conv, self.recipe, on_result=lambda r: None, listener=listener, watch=watch)
                    flight.on_result = lambda r, f=flight: done(r, f)  # type: ignore[misc]
                    flights.add(flight)
                    self._begin(flight)
                if source is None and not flights:
                    break
                self._drain(block=True)
                if commit is not None:
                    commit()
        except BaseException:  # Ctrl-C: abandon what is in flight; nothing is handed on for it
            for flight in list(flights):
                self._cancel(flight, notify=False)
            raise

    # -- serving: a background loop, conversations submitted at any time -------------------------------------

    def start(self) -> FlowScheduler:
        """Start the loop thread (serving). Idempotent."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name="moa-scheduler", daemon=True)
            self._thread.start()
        return self

    def submit(self, conv: Conversation, on_result: OnResult, *, listener: Listener | None = None,
               watch: Watch = "none", recipe: Recipe | None = None) -> Handle:
        """Admit a conversation now (or queue it when the window is full); ``on_result`` and the listener are called
        from the scheduler's threads. ``recipe``: this conversation's own variant of the scheduler's recipe (per-request
        sampling). Raises ServerBusy when the window and the queue are full, EngineDiedError once closed."""
        flight = _Flight(conv, recipe or self.recipe, on_result=on_result, listener=listener, watch=watch)
        with self._lock:
            if self._closed:
                raise EngineDiedError("the scheduler is shutting down")
            if self._active + len(self._queued) >= self.window + self.max_queue:
                raise ServerBusy(f"{self._active} conversations are running and {len(self._queued)} waiting (window "
                                 f"{self.window}, queue {self.max_queue}); retry later")
            self._queued.append(flight)
        self._post(("admit",))
        return Handle(self, flight)

    def depth(self) -> tuple[int, int]:
        """(queued, running) conversations."""
        with self._lock:
            return len(self._queued), self._active

    def close(self) -> None:
        """Stop: queued conversations and those in flight end with kind "aborted"."""
        with self._lock:
            self._closed = True
        self._post(("stop",))
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(10)

    def _serve(self) -> None:
        flights: set[_Flight] = set()
        while True:
            event = self._events.get()
            if event[0] == "stop":
                with self._lock:
                    waiting, self._queued = list(self._queued), deque()
                for flight in [*flights, *waiting]:
                    self._cancel(flight)
                return
            if event[0] != "admit":
                self._handle(event)
            with self._lock:
                admit = []
                while self._queued and self._active < self.window:
                    admit.append(self._queued.popleft())
                    self._active += 1
            for flight in admit:
                flights.add(flight)

                def finished(result: Result, _flight: _Flight = flight, _cb: OnResult = flight.on_result) -> None:
                    flights.discard(_flight)
                    with self._lock:
                        self._active -= 1
                    self._post(("admit",))
                    _cb(result)

                flight.on_result = finished
                self._begin(flight)

    # -- the loop's work ---------------------------------------------------------------------------------------

    def _post(self, event: tuple[Any, ...]) -> None:
        self._events.put(event)

    def _drain(self, *, block: bool) -> None:
        """Handle every queued event (waiting for the first when ``block``)."""
        try:
            event = self._events.get(timeout=0.5) if block else self._events.get_nowait()
        except queue.Empty:
            return
        while True:
            self._handle(event)
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                return

    def _handle(self, event: tuple[Any, ...]) -> None:
        kind = event[0]
        if kind == "done":
            _, flight, stage, index, attempt, gen = event
            self._on_done(flight, stage, index, attempt, gen)
        elif kind == "cancel":
            self._cancel(event[1])

    def _begin(self, flight: _Flight) -> None:
        self._enter_stage(flight, 1)

    def _enter_stage(self, flight: _Flight, stage: int) -> None:
        roles = flight.roles(stage)
        flight.stage = stage
        flight.responses = [None] * len(roles)
        flight.attempts = [0] * len(roles)
        flight.tickets = [None] * len(roles)
        flight.open = len(roles)
        for index in range(len(roles)):
            self._send(flight, index)

    def _send(self, flight: _Flight, index: int) -> None:
        stage = flight.stage
        role = flight.roles(stage)[index]
        aggregator = stage > flight.recipe.layers
        flight.attempts[index] += 1
        attempt = flight.attempts[index]
        label = f"L{stage}" if not aggregator else "agg"
        references = references_of(flight.layers[-1] if flight.layers else None)
        streams = flight.listener is not None and (flight.watch == "all" or (aggregator and flight.watch == "final"))
        prefix = flight.written if aggregator else ""
        request = build_request(flight.conv, role, references, stage=label, prefix=prefix,
                                budget_used=flight.counted)
        listener = flight.listener
        if listener is not None:
            listener(RoleEvent("start", flight.conv.id, stage, str(role.name), role.model, aggregator, attempt))
        on_delta = None
        if streams and listener is not None:
            conv_id, name, model = flight.conv.id, str(role.name), role.model

            def on_delta(piece: str) -> None:
                if aggregator:
                    flight.written += piece
                    flight.counted += 1
                listener(RoleEvent("delta", conv_id, stage, name, model, aggregator, attempt, delta=piece))

        def on_done(gen: Generation) -> None:
            self._events.put(("done", flight, stage, index, attempt, gen))

        flight.tickets[index] = self.runner.submit(role.model, request, on_done=on_done, on_delta=on_delta)

    def _on_done(self, flight: _Flight, stage: int, index: int, attempt: int, gen: Generation) -> None:
        if flight.finished or stage != flight.stage or attempt != flight.attempts[index]:
            return  # an answer to something abandoned
        if retryable(gen, attempt, flight.recipe.policy.retries):
            self._send(flight, index)
            return
        role = flight.roles(stage)[index]
        aggregator = stage > flight.recipe.layers
        if aggregator and flight.written and gen.ok:  # the streamed text, over every attempt it took
            gen = Generation(text=flight.written, usage=Usage(gen.usage.prompt_tokens, flight.counted),
                             seconds=gen.seconds, finish_reason=gen.finish_reason)
        response = to_response(role, gen, attempt)
        flight.responses[index] = response
        flight.tickets[index] = None
        flight.open -= 1
        if flight.listener is not None:
            flight.listener(RoleEvent("done", flight.conv.id, stage, response.role, response.model, aggregator,
                                      attempt, response=response))
        if flight.open:
            return
        if not aggregator:
            trace = LayerTrace(index=stage, responses=[r for r in flight.responses if r is not None])
            flight.layers.append(trace)
            why = too_few(stage, trace.responses, flight.recipe.policy.min_proposers)
            if why is not None:
                self._finish(flight, error=why, kind="too_few")
            else:
                self._enter_stage(flight, stage + 1)
            return
        agg = flight.responses[0]
        assert agg is not None
        if agg.ok:
            self._finish(flight, aggregator=agg)
        else:
            self._finish(flight, aggregator=agg, error=f"aggregator '{agg.role}' failed: {agg.error}",
                         kind=agg.kind or "failed")

    def _finish(self, flight: _Flight, *, aggregator: Response | None = None, error: str | None = None,
                kind: str | None = None) -> None:
        flight.finished = True
        result = Result(id=flight.conv.id, output=aggregator.text if aggregator and error is None else None,
                        error=error, layers=flight.layers, aggregator=aggregator,
                        seconds=time.perf_counter() - flight.started, kind=kind)
        flight.on_result(result)

    def _cancel(self, flight: _Flight, *, notify: bool = True) -> None:
        """Abandon ``flight``: cancel its requests (their late answers are ignored) and, when ``notify``, hand on a
        Result of kind "aborted"."""
        if flight.finished:
            return
        for ticket in [t for t in flight.tickets if t is not None]:
            ticket.cancel()
        if notify:
            self._finish(flight, error="the conversation was cancelled", kind="aborted")
        else:
            flight.finished = True


# -- stage --------------------------------------------------------------------------------------------------------


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

        def submit(conv: Conversation, role: Role, references: list[str], attempt: int) -> None:
            key = next(keys)
            request = build_request(conv, role, references, stage=f"L{layer}" if not aggregator else "agg")
            state.in_flight += 1
            if listener is not None:
                listener(RoleEvent("start", conv.id, layer, str(role.name), role.model, aggregator, attempt))

            def on_done(gen: Generation) -> None:
                state.done.put((key, conv, role, references, attempt, gen))

            tickets[key] = self.runner.submit(role.model, request, on_done=on_done)

        def handle(item: tuple[Any, ...]) -> None:
            key, conv, role, references, attempt, gen = item
            state.in_flight -= 1
            tickets.pop(key, None)
            if retryable(gen, attempt, policy.retries):
                submit(conv, role, references, attempt + 1)
                return
            response = to_response(role, gen, attempt)
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
                        self._emit(conv, journal, on_result, error=why, kind="too_few")
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
                    submit(conv, role, references, 1)
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


# -- choosing ----------------------------------------------------------------------------------------------------


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
