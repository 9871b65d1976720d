"""Chunk-wise aggregation (recipe ``aggregation: chunked``): the aggregator starts writing before the proposers end.

Every proposer of every layer, and the aggregator, is a *node* that writes its answer as a stream. A node of layer
k > 1 starts as soon as every node of layer k-1 has written its first chunk (``chunk_tokens`` tokens) or finished,
using those partial answers as references. It writes one chunk, then re-reads the references, which have grown by
a chunk meanwhile, and *continues its own answer* on them: its text so far goes in as an assistant turn, which the
prompt renderer turns into a continuation (so nothing already written, or already sent to a user, is ever taken
back). Once all its references are complete it writes the rest in one go. Layer 1 has no references and streams its
whole answer at once. So the layers run as a wavefront: the first token comes after about one chunk per layer
instead of one whole answer per layer.

A node whose chunk comes back empty has finished (it ended its answer); one whose downstream nodes have all finished
is stopped (nobody reads it any more). Failures follow the recipe's policy: a failed chunk is retried (continuing
from the text so far) up to ``policy.retries`` times, then the node is recorded as failed and its answer leaves the
references. A node starts only with at least ``min_proposers`` live references; if failures later leave fewer, it
keeps the references it had and finishes from them, so a started answer always ends. The aggregator never starting
is the conversation failing (ConversationFailed, before any text).

Chunks are counted in stream deltas: one token on vLLM, about one word on transformers, ``tokens_per_chunk`` words
on the fake backend. Engines run one request or many at a time; a node yields to a waiting node of a later layer on
the same model, so engines that serialize requests still favour the answer the user is waiting for.

Owns: the node graph, its threads, the chunk schedule and the trace of a chunked run. Never touches engines (only
the LayerRunner's ``stream``), the server or the CLI.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from moa_local.config.recipe import Recipe, Role
from moa_local.engines.base import Request, Runner, Usage
from moa_local.errors import ConversationFailed
from moa_local.pipeline.scheduler import Conversation, Listener, RoleEvent
from moa_local.pipeline.trace import LayerTrace, Response, Result
from moa_local.prompts import inject_references

_END = object()


@dataclass(eq=False)
class _Node:
    """One role's answer in one layer (the aggregator is layer ``layers + 1``)."""

    role: Role
    layer: int
    upstream: list[_Node]
    downstream: list[_Node] = field(default_factory=list)
    text: str = ""
    deltas: int = 0  # non-empty deltas received: the chunk clock
    chunks: int = 0  # segments completed
    budget_used: int = 0  # tokens charged against max_tokens (a cut chunk costs chunk_tokens)
    failures: int = 0
    requests: int = 0
    error: str | None = None
    finished: bool = False
    stopped: bool = False  # finished because nobody reads it any more
    pending: bool = False  # started a chunk and waits for its first delta
    references: list[str] | None = None  # the last references it wrote from
    started: float | None = None
    ended: float | None = None

    @property
    def terminal(self) -> bool:
        return self.finished or self.error is not None

    @property
    def name(self) -> str:
        return self.role.name or self.role.model


@dataclass
class ChunkedState:
    """The conversation and what its layers wrote so far."""

    conv: Conversation
    layers: list[LayerTrace] = field(default_factory=list)
    error: str | None = None


@dataclass(frozen=True)
class _Plan:
    action: str  # "run", "stop" or "fail"
    references: list[str] = field(default_factory=list)
    final: bool = False
    reason: str = ""


class ChunkedAggregation:
    """One conversation through a recipe with chunk-wise aggregation. ``deltas()`` runs it and yields the final
    answer as it is written; ``result()`` is its trace afterwards; ``state`` carries the layers as in full mode."""

    def __init__(self, recipe: Recipe, runner: Runner, conversation: Conversation, *,
                 listener: Listener | None = None) -> None:
        self.recipe = recipe
        self.runner = runner
        self.state = ChunkedState(conversation)
        self.listener = listener
        self.chunk = self.recipe.chunk_tokens
        self.layers: list[list[_Node]] = []
        previous: list[_Node] = []
        for index in range(1, self.recipe.layers + 1):
            nodes = [_Node(role=role, layer=index, upstream=previous) for role in recipe.proposer_roles()]
            for node in previous:
                node.downstream = nodes
            self.layers.append(nodes)
            previous = nodes
        self.aggregator = _Node(role=recipe.aggregator_role(), layer=self.recipe.layers + 1, upstream=previous)
        for node in previous:
            node.downstream = [self.aggregator]
        self.nodes = [n for layer in self.layers for n in layer] + [self.aggregator]
        self._cond = threading.Condition()
        self._out: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._cancelled = False
        self._threads: list[threading.Thread] = []
        self._started = time.perf_counter()

    # -- the public side ------------------------------------------------------------------------------------------

    def deltas(self) -> Iterator[str]:
        """Start every node and yield the aggregator's text as it is written.

        Raises ConversationFailed (before any text) when too few proposers answered for the aggregator to start.
        Closing the iterator early stops the nodes after their current chunk."""
        if self._threads:
            raise RuntimeError("a ChunkedAggregation runs once")
        for node in self.nodes:
            thread = threading.Thread(target=self._run_node, args=(node,), name=f"moa-chunk-{node.layer}-{node.name}", daemon=True)
            self._threads.append(thread)
        for thread in self._threads:
            thread.start()
        try:
            while True:
                item = self._out.get()
                if item is _END:
                    break
                yield item  # type: ignore[misc]
        finally:
            with self._cond:
                self._cancelled = True
                self._cond.notify_all()
            self._record()
        if self.aggregator.error is not None:
            raise ConversationFailed(self.state.error or self.aggregator.error)

    def __iter__(self) -> Iterator[str]:
        return self.deltas()

    def result(self) -> Result:
        """The trace of the run so far (complete once ``deltas()`` is exhausted)."""
        self._record()
        agg = self._response(self.aggregator)
        return Result(
            id=self.state.conv.id,
            output=agg.text if self.state.error is None else None,
            error=self.state.error,
            layers=self.state.layers,
            aggregator=agg,
            seconds=time.perf_counter() - self._started,
        )

    def close(self) -> None:
        """Stop every node after its current chunk."""
        with self._cond:
            self._cancelled = True
            self._cond.notify_all()

    # -- the schedule ---------------------------------------------------------------------------------------------

    def _plan(self, node: _Node) -> _Plan | None:
        """What ``node`` does next, or None to wait. Called with the lock held."""
        if self._cancelled or (node.downstream and all(d.terminal for d in node.downstream)):
            return _Plan("stop")
        if not node.upstream:
            return _Plan("run", final=True)
        live = [u for u in node.upstream if u.error is None]
        needed = min(self.recipe.policy.min_proposers, len(node.upstream))
        if len(live) < needed:
            if node.references is None:
                errors = "; ".join(f"{u.name}: {u.error}" for u in node.upstream if u.error)
                return _Plan(
                    "fail",
                    reason=f"layer {node.layer - 1}: only {len(live)} of {len(node.upstream)} proposers answered "
                    f"(min_proposers={self.recipe.policy.min_proposers}): {errors}",
                )
            return _Plan("run", references=node.references, final=True)  # keep the references it had
        need = (node.chunks + 1) * self.chunk
        if any(not (u.terminal or u.chunks > node.chunks or u.deltas >= need) for u in live):
            return None
        if any(o.pending and o.layer > node.layer and o.role.model == node.role.model for o in self.nodes):
            return None  # let the later layer's chunk reach the engine first
        return _Plan("run", references=[u.text for u in live], final=all(u.terminal for u in node.upstream))

    def _run_node(self, node: _Node) -> None:
        try:
            while self._step(node):
                pass
        except Exception as exc:  # a bug here must end the node visibly, never hang the stream
            with self._cond:
                node.error = node.error or f"internal error in chunked aggregation: {exc!r}"
        finally:
            with self._cond:
                if not node.terminal:
                    node.finished = True
                node.pending = False
                node.ended = time.perf_counter()
                self._cond.notify_all()
            self._report(node)
            if node is self.aggregator:
                self._out.put(_END)

    def _step(self, node: _Node) -> bool:
        """Run one chunk of ``node``; False when the node is done."""
        with self._cond:
            plan = None
            while plan is None:
                plan = self._plan(node)
                if plan is None:
                    self._cond.wait()
            if plan.action == "stop":
                node.finished = node.stopped = True
                return False
            if plan.action == "fail":
                node.error = plan.reason
                if node is self.aggregator:
                    self.state.error = plan.reason
                return False
            node.pending = True
            first = node.started is None
            node.started = node.started or time.perf_counter()
            node.requests += 1
            node.references = plan.references
            prefix = node.text
        if first:
            self._event(node, "start")
        role = node.role
        budget = role.sampling.max_tokens - node.budget_used
        size = budget if plan.final else min(self.chunk, budget)
        messages = inject_references(self.state.conv.messages, plan.references, system_prompt=role.system_prompt)
        if prefix:
            messages.append({"role": "assistant", "content": prefix})
        stage = f"L{node.layer}" if node.layer <= self.recipe.layers else "agg"
        request = Request(
            messages=messages,
            sampling=role.sampling.model_copy(update={"max_tokens": size}),
            request_id=f"{self.state.conv.id}/{stage}/{node.name}/c{node.chunks}",
        )
        written = ""
        try:
            for delta in self.runner.stream(role.model, request):
                if not delta:
                    continue
                with self._cond:
                    node.text += delta
                    node.deltas += 1
                    node.pending = False
                    self._cond.notify_all()
                written += delta
                if node is self.aggregator:
                    self._out.put(delta)
                self._event(node, "delta", delta=delta)
                if self._cancelled or (node.downstream and all(d.terminal for d in node.downstream)):
                    node.stopped = True  # nobody reads this answer any more
                    break
        except Exception as exc:  # an engine failure is this node's failure: retried, then recorded
            with self._cond:
                node.pending = False
                node.failures += 1
                if node.failures > self.recipe.policy.retries:
                    node.error = f"{exc}"
                    if node is self.aggregator:
                        self.state.error = f"aggregator '{node.name}' failed: {exc}"
                    return False
                return True  # the next chunk continues from what was written
        with self._cond:
            node.pending = False
            node.chunks += 1
            if plan.final or not written.strip():
                node.finished = True
            else:
                node.budget_used += size
                node.finished = node.budget_used >= role.sampling.max_tokens
            self._cond.notify_all()
            return not node.finished

    # -- progress and trace ---------------------------------------------------------------------------------------

    def _event(self, node: _Node, kind: str, *, delta: str = "", response: Response | None = None) -> None:
        if self.listener is not None:
            self.listener(RoleEvent(kind, self.state.conv.id, node.layer, node.name, node.role.model,  # type: ignore[arg-type]
                                    node is self.aggregator, 1, delta=delta, response=response))

    def _report(self, node: _Node) -> None:
        self._event(node, "done", response=self._response(node))

    def _response(self, node: _Node) -> Response:
        with self._cond:
            end = node.ended or time.perf_counter()
            return Response(
                role=node.name,
                model=node.role.model,
                text=node.text if node.error is None else None,
                error=node.error,
                usage=Usage(0, node.deltas),
                seconds=(end - node.started) if node.started else 0.0,
                attempts=node.failures if node.error is not None and node.failures else node.failures + 1,
            )

    def _record(self) -> None:
        layers = [LayerTrace(index=i, responses=[self._response(n) for n in nodes]) for i, nodes in enumerate(self.layers, 1)]
        with self._cond:
            self.state.layers = layers
            if self.aggregator.error is not None and self.state.error is None:
                self.state.error = f"aggregator '{self.aggregator.name}' failed: {self.aggregator.error}"
