"""The flow schedule: every conversation moves on the moment its previous layer is in.

Each conversation is a small dataflow (a ``_Flight``): its layer-1 requests go to the runner when it is admitted,
its layer-k requests the moment all its layer-(k-1) answers are in, its aggregator request the moment its last
layer is in. No engine waits at a layer barrier: while one conversation waits for the slow engine, the fast one
works on another's next layer. At most ``window`` conversations are in flight. ``run`` drives a whole source in the
calling thread (batch jobs, ``MoA.run``), reading it only as the window frees up; ``start`` + ``submit`` serve
conversations that arrive at any time (the HTTP server, chat) from a background thread. Results come back in the
order they finish. A streamed aggregator that is retried continues the text already sent (assistant prefix, the
rest of its token budget). All state is touched by one loop thread; engine callbacks only post events.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from moa_local.config.recipe import Recipe, Role
from moa_local.engines.base import Generation, Runner, Ticket, Usage
from moa_local.errors import EngineDiedError, ServerBusy
from moa_local.pipeline.scheduler import (
    Conversation,
    Listener,
    OnResult,
    RoleEvent,
    Watch,
    build_request,
    failure_kind,
    references_of,
    retryable,
    to_response,
    too_few,
)
from moa_local.pipeline.trace import LayerTrace, Response, Result
from moa_local.pipeline.trim import ReferenceTrim


class _Flight:
    """One conversation in flight under the flow schedule. Touched only by the scheduler's loop thread, except
    ``written`` (the aggregator's streamed text), appended to by the engine thread that streams it."""

    __slots__ = ("conv", "recipe", "proposers", "aggregator", "on_result", "listener", "watch", "layers", "stage",
                 "responses", "attempts", "sends", "trims", "open", "tickets", "started", "finished", "written",
                 "counted")

    def __init__(self, conv: Conversation, recipe: Recipe, roles: tuple[list[Role], Role], *, on_result: OnResult,
                 listener: Listener | None, watch: Watch) -> None:
        self.conv = conv
        self.recipe = recipe
        self.proposers, self.aggregator = roles
        self.on_result = on_result
        self.listener = listener
        self.watch = watch
        self.layers: list[LayerTrace] = []
        self.stage = 0
        self.responses: list[Response | None] = []
        self.attempts: list[int] = []
        """Per role of the stage: its tries under the retry policy."""
        self.sends: list[int] = []
        """Per role of the stage: requests sent (retries and trimmed tries), so a late answer is known."""
        self.trims: list[ReferenceTrim] = []
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
        self._roles: dict[int, tuple[Recipe, tuple[list[Role], Role]]] = {}

    def _roles_of(self, recipe: Recipe) -> tuple[list[Role], Role]:
        """A recipe's expanded proposer roles and its aggregator role, computed once per recipe object."""
        cached = self._roles.get(id(recipe))
        if cached is None or cached[0] is not recipe:
            if len(self._roles) > 256:
                self._roles.clear()
            cached = self._roles[id(recipe)] = (recipe, (recipe.proposer_roles(), recipe.aggregator_role()))
        return cached[1]

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
                    flight = _Flight(conv, self.recipe, self._roles_of(self.recipe), on_result=lambda r: None,
                                     listener=listener, watch=watch)
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
        recipe = recipe or self.recipe
        with self._lock:
            roles = self._roles_of(recipe)
        flight = _Flight(conv, recipe, roles, on_result=on_result, listener=listener, watch=watch)
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
            _, flight, stage, index, send, gen = event
            self._on_done(flight, stage, index, send, gen)
        elif kind == "cancel":
            self._cancel(event[1])

    def _begin(self, flight: _Flight) -> None:
        self._enter_stage(flight, 1)

    def _enter_stage(self, flight: _Flight, stage: int) -> None:
        roles = flight.roles(stage)
        flight.stage = stage
        references = references_of(flight.layers[-1] if flight.layers else None)
        flight.responses = [None] * len(roles)
        flight.attempts = [1] * len(roles)
        flight.sends = [0] * len(roles)
        flight.trims = [ReferenceTrim(references) for _ in roles]
        flight.tickets = [None] * len(roles)
        flight.open = len(roles)
        for index in range(len(roles)):
            self._send(flight, index)

    def _send(self, flight: _Flight, index: int) -> None:
        stage = flight.stage
        role = flight.roles(stage)[index]
        aggregator = stage > flight.recipe.layers
        flight.sends[index] += 1
        attempt, send = flight.attempts[index], flight.sends[index]
        label = f"L{stage}" if not aggregator else "agg"
        streams = flight.listener is not None and (flight.watch == "all" or (aggregator and flight.watch == "final"))
        prefix = flight.written if aggregator else ""
        request = build_request(flight.conv, role, flight.trims[index].references, stage=label, prefix=prefix,
                                budget_used=flight.counted)
        flight.trims[index].sent(request.messages)
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
            self._events.put(("done", flight, stage, index, send, gen))

        flight.tickets[index] = self.runner.submit(role.model, request, on_done=on_done, on_delta=on_delta)

    def _on_done(self, flight: _Flight, stage: int, index: int, send: int, gen: Generation) -> None:
        if flight.finished or stage != flight.stage or send != flight.sends[index]:
            return  # an answer to something abandoned
        trim, attempt = flight.trims[index], flight.attempts[index]
        if trim.retry(gen):  # its references made it too long: again with them trimmed
            self._send(flight, index)
            return
        if retryable(gen, attempt, flight.recipe.policy.retries):
            flight.attempts[index] += 1
            self._send(flight, index)
            return
        role = flight.roles(stage)[index]
        aggregator = stage > flight.recipe.layers
        if aggregator and flight.written and gen.ok:  # the streamed text, over every attempt it took
            gen = Generation(text=flight.written, usage=Usage(gen.usage.prompt_tokens, flight.counted),
                             seconds=gen.seconds, finish_reason=gen.finish_reason)
        response = to_response(role, trim.explain(gen), attempt, trimmed=trim.record())
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
                self._finish(flight, error=why, kind=failure_kind(trace.responses))
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
