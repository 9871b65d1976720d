"""What runs inside an engine's Ray actor: the actor body that starts one engine and answers the runner's calls.

The actor process is the engine's host. It calls ``moa_local.engines.create_engine`` there, so the fake,
transformers and vllm backends all work unchanged (the vllm backend starts its worker process from the actor; that
worker dies with the actor). One exception: a vLLM engine that runs its tensor-parallel workers through vLLM's Ray
executor must be created in the actor process itself, because vLLM finds its placement group only there; for it
the actor drives ``VLLMHost`` in-process (:class:`InProcessEngine`), as worker.py's loop would in a worker.

Never imports ray at module level (only inside the actor's methods) and knows nothing about layers or plans.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from moa_local.config.model import ModelConfig
from moa_local.config.recipe import EngineOptions
from moa_local.engines import create_engine
from moa_local.engines.base import BatchingEngine, Engine, Generation, MemoryReport, Request
from moa_local.engines.cpu import available_cores, format_cores, parse_cores
from moa_local.engines.worker import Host
from moa_local.errors import EngineDiedError, EngineError


def localize_cpu_threads(options: EngineOptions, cores: Sequence[int]) -> EngineOptions:
    """Keep the plan's core binding when this node has those cores; else bind to as many of this node's first
    cores (a plan made for the cluster's total core count names cores some nodes lack)."""
    if not options.cpu_threads:
        return options
    try:
        wanted = parse_cores(options.cpu_threads)
    except ValueError:
        return options
    if not wanted or wanted <= set(cores):
        return options
    local = sorted(cores)[: max(1, len(wanted))]
    return options.model_copy(update={"cpu_threads": format_cores(local)})


class InProcessEngine(BatchingEngine):
    """An Engine over a worker.py ``Host`` driven in this process: ``handle`` a call, ``step`` until its reply.
    One call at a time, from the dispatcher thread (requests queued meanwhile form the next batch)."""

    def __init__(self, model_id: str, host: Host, *, to_generation: Callable[[dict[str, Any]], Generation]) -> None:
        self.model_id = model_id
        self.host: Host | None = host
        self._to_generation = to_generation
        self._next_id = 1
        self._start_dispatcher()

    def _call(self, op: str, payload: Any) -> Iterator[tuple[str, Any]]:
        host = self.host
        if host is None:
            raise EngineDiedError(f"engine '{self.model_id}' is closed")
        call_id, self._next_id = self._next_id, self._next_id + 1
        replies: list[tuple[str, Any]] = []

        def reply(kind: str, cid: int, data: Any) -> None:
            if cid == call_id:
                replies.append((kind, data))

        finished = False
        try:
            host.handle(op, call_id, payload, reply)
            while True:
                while replies:
                    kind, data = replies.pop(0)
                    if kind == "error":
                        finished = True
                        raise EngineError(f"engine '{self.model_id}': {data}")
                    yield kind, data
                    if kind == "result":
                        finished = True
                        return
                if not host.busy():
                    raise EngineDiedError(f"engine '{self.model_id}' went idle without answering call {call_id}")
                host.step(reply)
        finally:
            if not finished and self.host is not None:
                self.host.handle("abort", call_id, None, reply)

    def run_batch(self, requests: Sequence[Request]) -> list[Generation]:
        if not requests:
            return []
        for kind, data in self._call("generate", [(list(r.messages), r.sampling) for r in requests]):
            if kind == "result":
                return [self._to_generation(d) for d in data]
        raise EngineDiedError(f"engine '{self.model_id}' ended a call without a result")

    def run_stream(self, request: Request) -> Iterator[str]:
        for kind, data in self._call("stream", (list(request.messages), request.sampling)):
            if kind == "delta":
                yield data
            elif kind == "result" and data.get("error"):
                raise EngineError(f"{self.model_id}: {data['error']}")

    def close(self) -> None:
        self._stop_dispatcher()
        host, self.host = self.host, None
        if host is not None:
            host.close()


def start_in_process_vllm(config: ModelConfig, options: EngineOptions) -> Engine:
    """A vLLM engine created in this (the actor's) process, so vLLM's Ray executor uses the actor's placement
    group. Sets the worker environment before vllm is imported."""
    from moa_local.engines.vllm import VLLMHost, _generation, check_options, worker_env
    from moa_local.models.prepare import require_prepared

    check_options(config, options)
    path = require_prepared(config)
    os.environ.update(worker_env(options))
    host = VLLMHost(config=config, options=options, path=str(path))
    return InProcessEngine(config.id, host, to_generation=_generation)


class EngineHost:
    """The body of one engine's Ray actor (wrapped with ``ray.remote`` by the runner). ``__init__`` loads the model;
    Ray reruns it when it restarts the actor, so a restarted actor comes back with a fresh engine."""

    def __init__(
        self,
        config: ModelConfig,
        options: EngineOptions,
        *,
        backend: str,
        env: dict[str, str] | None = None,
        in_process: bool = False,
    ) -> None:
        os.environ.update(env or {})
        self.model_id = config.id
        self.started = time.time()
        options = localize_cpu_threads(options, available_cores())
        self.options = options
        if in_process and backend == "vllm":
            self.engine = start_in_process_vllm(config, options)
        else:
            self.engine = create_engine(config, options=options, backend=backend)
        self.load_seconds = time.time() - self.started

    def where(self) -> dict[str, Any]:
        """Where this engine lives: Ray node id, host name, pid, whether Ray restarted the actor."""
        import ray

        ctx = ray.get_runtime_context()
        return {
            "model": self.model_id,
            "node_id": ctx.get_node_id(),
            "hostname": socket.gethostname(),
            "pid": os.getpid(),
            "restarted": bool(ctx.was_current_actor_reconstructed),
            "load_seconds": round(self.load_seconds, 2),
            "cpu_threads": self.options.cpu_threads,
        }

    def generate(self, requests: list[Request]) -> list[Generation]:
        return self.engine.generate(requests)

    def stream(self, request: Request) -> Iterator[str]:
        yield from self.engine.stream(request)

    def memory(self) -> MemoryReport:
        return self.engine.memory()

    def close(self) -> None:
        self.engine.close()
