"""The Ray LayerRunner: a recipe's engines as Ray actors, placed by placement groups derived from the plan.

The pipeline and recipes do not change, only where engines live. ``RayRunner.run(batches)`` sends each model's
share to its actor and waits on the refs together (the engines run in parallel, each batching its share);
``stream`` is a Ray streaming generator (``num_returns="streaming"``), or generate-then-yield over Ray Client.

Phases: engines of one plan phase are resident together. A plan with several phases (the recipe does not fit the
cluster at once) is walked by reload: before a phase's models run, the other phase's actors are closed and this
phase's are started (their placement groups reserved on entry, released when no resident engine uses them).

Failures, never dropped: actors are created with ``max_restarts`` (recipe ``cluster.max_restarts``) and
``max_task_retries=0``; this runner does the retry. When an actor dies mid-call (or its engine reports
EngineDiedError, which makes the runner kill the actor so Ray restarts it), the runner waits for the restart (at most
``cluster.restart_timeout_s``; the restarted actor reruns ``__init__``, i.e. reloads the model) and sends that batch
once more. If that fails too, each request becomes a failed Generation and the pipeline's failure policy decides.

ray is imported lazily (MissingDependencyError names the ``ray`` extra). Knows nothing about layers or prompts.
"""

from __future__ import annotations

import contextlib
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from moa_local.cluster.host import EngineHost
from moa_local.cluster.layout import ActorSpec, ClusterLayout, derive_layout
from moa_local.cluster.session import RaySession, cluster_hardware, connect, require_ray
from moa_local.config.recipe import Recipe
from moa_local.config.registry import load_model_config
from moa_local.engines.base import DONE_TICKET, Generation, OnDelta, OnDone, Request, Runner, Ticket, Usage
from moa_local.errors import EngineDiedError, EngineError, EngineStartError, PlacementError

FORWARDED_ENV = ("MOA_LOCAL_HOME", "MOA_LOCAL_ENGINE_START_TIMEOUT", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
"""Driver environment variables an engine actor gets too (when set)."""


def _short(exc: BaseException) -> str:
    """The first line of an error, without Ray's traceback."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip()


class RayRunner(Runner):
    """Owns a recipe's engine actors and placement groups on a Ray cluster. ``submit`` queues a request for its
    model; one dispatcher thread per model sends whatever is queued to the actor as one batch (an actor runs one
    call at a time), so a request never waits for other models or layers, only for its actor's current batch."""

    def __init__(
        self,
        recipe: Recipe,
        *,
        backend: str,
        plan: Any,
        session: RaySession | None = None,
        hardware: Any = None,
        node_ids: list[str] | None = None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        """``plan``: the planner's Plan for this cluster; ``hardware``/``node_ids``: what it was planned on and which
        Ray node each plan node is (pins GPU groups to their nodes); ``session``: closed with the runner."""
        self._ray = require_ray()
        self.recipe = recipe
        self.backend = backend
        self.plan = plan
        self.session = session
        self.options = recipe.cluster
        self.node_ids = list(node_ids or [])
        self.layout: ClusterLayout = derive_layout(plan, recipe, backend=backend, hardware=hardware)
        self._log = log or (lambda msg: print(msg, file=sys.stderr))
        self.actors: dict[str, Any] = {}
        self.where: dict[str, dict[str, Any]] = {}
        """Model id -> where its actor runs (node_id, hostname, pid, restarted, ...), refreshed after restarts."""
        self.recoveries: dict[str, int] = {m: 0 for m in self.layout.actors}
        """Model id -> batches retried after the actor was restarted."""
        self._groups: dict[int, Any] = {}
        self._resident: int | None = None
        self._lock = threading.RLock()
        self._closed = False
        self._queues: dict[str, queue.SimpleQueue[tuple[Request, OnDone] | None]] = {}
        self._dispatchers: list[threading.Thread] = []
        try:
            first = plan.schedule[0].phase if plan.schedule else 0
            self._enter_phase(first)
        except BaseException:
            self.close()
            raise

    @classmethod
    def for_recipe(cls, recipe: Recipe, *, backend: str, address: str, log: Callable[[str], None] | None = None) -> RayRunner:
        """Connect to ``address``, probe the cluster, plan the recipe on it and start the first phase's engines."""
        from moa_local.placement import plan_recipe

        session = connect(address)
        try:
            found = cluster_hardware()
            plan = plan_recipe(recipe, found.hardware, backend=backend)
            return cls(recipe, backend=backend, plan=plan, session=session, hardware=found.hardware,
                       node_ids=found.node_ids, log=log)
        except BaseException:
            session.close()
            raise

    # -- placement groups ---------------------------------------------------------------------------------------

    def _create_group(self, index: int) -> Any:
        from ray.util.placement_group import placement_group

        spec = self.layout.groups[index]
        kwargs: dict[str, Any] = {}
        if self.node_ids and spec.bundle_nodes and all(n is not None and n < len(self.node_ids) for n in spec.bundle_nodes):
            kwargs["bundle_label_selector"] = [{"ray.io/node-id": self.node_ids[n]} for n in spec.bundle_nodes if n is not None]
        return placement_group(spec.bundles, strategy=spec.strategy, name=f"{spec.name}-{os.getpid()}-{index}", **kwargs)

    def _reserve(self, indices: list[int]) -> None:
        """Create the placement groups ``indices`` (most constrained first) and wait until the cluster holds them."""
        from ray.util.placement_group import remove_placement_group

        ray = self._ray

        def constrained(i: int) -> tuple[int, float]:
            spec = self.layout.groups[i]
            custom = any(k not in ("CPU", "GPU") for b in spec.bundles for k in b)
            return (0 if custom else 1, -sum(b.get("GPU", 0) + b.get("CPU", 0) for b in spec.bundles))

        new = [i for i in sorted(indices, key=constrained) if i not in self._groups]
        for i in new:
            self._groups[i] = self._create_group(i)
        deadline = time.monotonic() + self.options.placement_timeout_s
        for i in new:
            try:
                ray.get(self._groups[i].ready(), timeout=max(0.1, deadline - time.monotonic()))
            except Exception as exc:
                spec = self.layout.groups[i]
                remove_placement_group(self._groups.pop(i))
                raise PlacementError(
                    f"the Ray cluster did not reserve placement group '{spec.name}' for {', '.join(spec.models)} "
                    f"(bundles {spec.bundles}, {spec.strategy}) within {self.options.placement_timeout_s:.0f} s "
                    f"({_short(exc)}). Free resources: {ray.available_resources()}. Add nodes, free resources, or "
                    f"raise cluster.placement_timeout_s."
                ) from exc

    def _release(self, keep: set[int]) -> None:
        from ray.util.placement_group import remove_placement_group

        for i in [i for i in self._groups if i not in keep]:
            remove_placement_group(self._groups.pop(i))

    # -- actors -------------------------------------------------------------------------------------------------

    def _actor_env(self, spec: ActorSpec) -> dict[str, str]:
        env = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
        return {**env, **spec.env}

    def _start_actor(self, model_id: str) -> None:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        ray = self._ray
        spec = self.layout.actors[model_id]
        strategy = PlacementGroupSchedulingStrategy(
            placement_group=self._groups[spec.group],
            placement_group_bundle_index=spec.bundle_index,
            placement_group_capture_child_tasks=spec.ray_executor,
        )
        self._log(f"starting engine for {model_id} on the Ray cluster (group {self.layout.groups[spec.group].name}) ...")
        handle = ray.remote(EngineHost).options(
            num_cpus=spec.num_cpus,
            num_gpus=spec.num_gpus,
            max_restarts=self.options.max_restarts,
            max_task_retries=0,
            max_concurrency=1,
            scheduling_strategy=strategy,
        ).remote(
            load_model_config(model_id),
            spec.options,
            backend=self.backend,
            env=self._actor_env(spec),
            in_process=spec.ray_executor,
        )
        self.actors[model_id] = handle
        try:
            self.where[model_id] = ray.get(handle.where.remote(), timeout=self.options.start_timeout_s)
        except Exception as exc:
            raise EngineStartError(
                f"engine '{model_id}' did not start on the Ray cluster: {_short(exc)}. The actor's log is in the "
                "Ray session's logs folder (/tmp/ray/session_latest/logs on its node)."
            ) from exc

    def _stop_actor(self, model_id: str) -> str | None:
        ray = self._ray
        handle = self.actors.pop(model_id, None)
        self.where.pop(model_id, None)
        if handle is None:
            return None
        error = None
        try:
            ray.get(handle.close.remote(), timeout=60)
        except ray.exceptions.RayActorError:
            pass  # already dead: nothing to close
        except Exception as exc:  # the engine's close failed, or it is stuck: killed below anyway
            error = f"{model_id}: {_short(exc)}"
        ray.kill(handle, no_restart=True)
        return error

    def _enter_phase(self, phase: int) -> None:
        """Make ``phase`` resident: stop other engines, reserve its groups, start its engines (engines that share a
        GPU group one after another, since co-located vLLM engines profile memory at start; the rest in parallel)."""
        with self._lock:
            if self._resident == phase:
                return
            if self._closed:
                raise EngineError("the Ray runner is closed")
            for model_id in [m for m in self.actors if self.layout.phase_of(m) != phase]:
                self._stop_actor(model_id)
            self._resident = None
            needed = self.layout.groups_for(phase)
            self._release(set(needed))
            self._reserve(needed)
            chains: dict[int, list[str]] = {}
            for model_id in self.layout.phases[phase]:
                chains.setdefault(self.layout.actors[model_id].group, []).append(model_id)

            def start_chain(models: list[str]) -> None:
                for model_id in models:
                    self._start_actor(model_id)

            with ThreadPoolExecutor(max_workers=max(1, len(chains)), thread_name_prefix="moa-ray-start") as pool:
                for future in [pool.submit(start_chain, c) for c in chains.values()]:
                    future.result()
            self._resident = phase

    # -- calls --------------------------------------------------------------------------------------------------

    def _recover(self, model_id: str, cause: BaseException) -> str | None:
        """Wait for Ray to restart ``model_id``'s actor (its model reloads). None when it is back, else why not."""
        ray = self._ray
        from ray.exceptions import ActorDiedError, ActorUnavailableError, GetTimeoutError

        handle = self.actors[model_id]
        if not isinstance(cause, ray.exceptions.RayActorError):  # the engine died inside a live actor: restart it
            ray.kill(handle, no_restart=False)
        self._log(f"engine '{model_id}' died ({_short(cause)}); waiting for Ray to restart it ...")
        deadline = time.monotonic() + self.options.restart_timeout_s
        while (left := deadline - time.monotonic()) > 0:
            try:
                self.where[model_id] = ray.get(handle.where.remote(), timeout=left)
            except ActorUnavailableError:
                time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
                continue
            except ActorDiedError as exc:
                return f"died and was not restarted (max_restarts={self.options.max_restarts}): {_short(exc)}"
            except GetTimeoutError:
                break
            self.recoveries[model_id] += 1
            self._log(f"engine '{model_id}' is back (pid {self.where[model_id]['pid']}); retrying its batch")
            return None
        return f"was not back within {self.options.restart_timeout_s:.0f} s after dying"

    def _recoverable(self, exc: BaseException) -> bool:
        return isinstance(exc, (self._ray.exceptions.RayActorError, EngineDiedError))

    def _generate(self, model_id: str, requests: list[Request]) -> list[Generation]:
        """One model's share, retried once after an actor restart; failures become failed Generations."""
        ray = self._ray
        started = time.monotonic()

        def failed(why: str) -> list[Generation]:
            seconds = time.monotonic() - started
            return [Generation.failed(f"engine '{model_id}' on the Ray cluster {why}", seconds=seconds) for _ in requests]

        if not requests:
            return []
        try:
            return list(ray.get(self.actors[model_id].generate.remote(requests)))
        except Exception as exc:
            if not self._recoverable(exc):
                return failed(f"failed: {_short(exc)}")
            why = self._recover(model_id, exc)
        if why is not None:
            return failed(why)
        try:
            return list(ray.get(self.actors[model_id].generate.remote(requests)))
        except Exception as exc:
            return failed(f"failed again after a restart: {_short(exc)}")

    def run(self, batches: dict[str, list[Request]]) -> dict[str, list[Generation]]:
        """Each model's requests go to its actor at once; the actors work in parallel. Models of other phases run
        after a phase switch (resident phase first)."""
        by_phase: dict[int, list[str]] = {}
        for model_id in batches:
            if model_id not in self.layout.actors:
                raise EngineError(f"no engine for model '{model_id}'; on the cluster: {', '.join(self.layout.actors)}")
            by_phase.setdefault(self.layout.phase_of(model_id), []).append(model_id)
        order = sorted(by_phase, key=lambda p: (p != self._resident, p))
        out: dict[str, list[Generation]] = {}
        with self._lock if len(self.layout.phases) > 1 else contextlib.nullcontext():
            for phase in order:
                self._enter_phase(phase)
                models = by_phase[phase]
                with ThreadPoolExecutor(max_workers=len(models), thread_name_prefix="moa-ray-call") as pool:
                    futures = {m: pool.submit(self._generate, m, batches[m]) for m in models}
                    out.update({m: f.result() for m, f in futures.items()})
        return out

    def stream(self, model_id: str, request: Request) -> Iterator[str]:
        """Text deltas of one answer, as the actor produces them. An actor that dies before the first delta is
        waited for and asked again; after the first delta the stream fails with EngineDiedError."""
        if model_id not in self.layout.actors:
            raise EngineError(f"no engine for model '{model_id}'; on the cluster: {', '.join(self.layout.actors)}")
        ray = self._ray
        self._enter_phase(self.layout.phase_of(model_id))
        for attempt in range(2):
            sent = False
            try:
                if self.session is not None and self.session.client:
                    (gen,) = ray.get(self.actors[model_id].generate.remote([request]))
                    if gen.error:
                        raise EngineError(f"{model_id}: {gen.error}")
                    yield gen.text or ""
                    return
                refs = self.actors[model_id].stream.options(num_returns="streaming").remote(request)
                for ref in refs:
                    piece = ray.get(ref)
                    sent = True
                    yield piece
                return
            except Exception as exc:
                if isinstance(exc, EngineError) and not isinstance(exc, EngineDiedError):
                    raise
                if sent or attempt or not self._recoverable(exc):
                    raise EngineDiedError(f"engine '{model_id}' on the Ray cluster failed mid-stream: {_short(exc)}") from exc
                why = self._recover(model_id, exc)
                if why is not None:
                    raise EngineDiedError(f"engine '{model_id}' on the Ray cluster {why}") from exc

    def submit(self, model_id: str, request: Request, *, on_done: OnDone, on_delta: OnDelta | None = None) -> Ticket:
        if model_id not in self.layout.actors or self._closed:
            why = "the Ray runner is closed" if self._closed else \
                f"no engine for model '{model_id}'; on the cluster: {', '.join(self.layout.actors)}"
            on_done(Generation.failed(why, kind="engine_down"))
            return DONE_TICKET
        if on_delta is not None:  # a stream: its own thread reads the actor's streaming generator
            threading.Thread(target=self._stream_to, args=(model_id, request, on_done, on_delta), daemon=True,
                             name=f"moa-ray-stream-{model_id}").start()
            return DONE_TICKET
        with self._lock:
            q = self._queues.get(model_id)
            if q is None:
                q = self._queues[model_id] = queue.SimpleQueue()
                thread = threading.Thread(target=self._dispatch, args=(model_id, q), daemon=True,
                                          name=f"moa-ray-{model_id}")
                self._dispatchers.append(thread)
                thread.start()
        q.put((request, on_done))
        return DONE_TICKET

    def _dispatch(self, model_id: str, q: queue.SimpleQueue[tuple[Request, OnDone] | None]) -> None:
        while True:
            first = q.get()
            if first is None:
                return
            items = [first]
            while True:
                try:
                    nxt = q.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    q.put(None)
                    break
                items.append(nxt)
            try:
                gens = self.run({model_id: [r for r, _ in items]})[model_id]
            except Exception as exc:  # the runner itself failed: every request of the batch fails
                gens = [Generation.failed(f"{type(exc).__name__}: {exc}", kind="engine_down") for _ in items]
            for (_, on_done), gen in zip(items, gens, strict=True):
                on_done(gen)

    def _stream_to(self, model_id: str, request: Request, on_done: OnDone, on_delta: OnDelta) -> None:
        started = time.monotonic()
        text, count = "", 0
        try:
            for piece in self.stream(model_id, request):
                if piece:
                    text, count = text + piece, count + 1
                    on_delta(piece)
        except Exception as exc:
            kind = "engine_down" if isinstance(exc, EngineDiedError) else "failed"
            on_done(Generation.failed(str(exc), kind=kind, seconds=time.monotonic() - started))  # type: ignore[arg-type]
            return
        finish = "length" if count >= request.sampling.max_tokens else "stop"
        on_done(Generation(text=text, usage=Usage(0, count), seconds=time.monotonic() - started, finish_reason=finish))

    def model_ids(self) -> list[str]:
        return list(self.layout.actors)

    @property
    def resident_phase(self) -> int | None:
        return self._resident

    def health(self) -> dict[str, bool]:
        """Model id -> whether its actor answers within 5 s."""
        alive = {}
        for model_id, handle in list(self.actors.items()):
            try:
                self._ray.get(handle.where.remote(), timeout=5)
                alive[model_id] = True
            except Exception:
                alive[model_id] = False
        return alive

    def close(self) -> None:
        """Close every engine, kill the actors, release the placement groups, disconnect. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for q in self._queues.values():
                q.put(None)
            errors = [e for e in (self._stop_actor(m) for m in list(self.actors)) if e]
            try:
                self._release(set())
            finally:
                if self.session is not None:
                    self.session.close()
        if errors:
            raise EngineDiedError("errors while closing engines on the Ray cluster: " + "; ".join(errors))


