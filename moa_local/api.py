"""The public Python API: ``moa_local.load(recipe) -> MoA``; ``MoA.run([...]) -> [Result]``.

    with moa_local.load("tiny") as moa:
        result = moa.run(["What is the capital of France?"])[0]
        print(result.output)

Turns prompts into conversations, picks the backend, owns the runner's lifetime. The CLI and server call this.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from moa_local.config.recipe import Recipe, override_sampling
from moa_local.config.registry import format_validation_error, load_recipe
from moa_local.engines import resolve_backend
from moa_local.errors import InputError, RecipeError
from moa_local.messages import validate_messages
from moa_local.pipeline import Conversation, Listener, MoAPipeline, Result, Runner, Schedule, Streamed
from moa_local.prompts import Message

if TYPE_CHECKING:
    from moa_local.placement import Plan

PromptLike = str | list[Message] | Conversation


def to_conversation(item: PromptLike, index: int) -> Conversation:
    if isinstance(item, Conversation):
        return item
    if isinstance(item, str):
        if not item.strip():
            raise InputError(f"prompt {index} is empty")
        return Conversation(id=str(index), messages=[{"role": "user", "content": item}])
    return Conversation(id=str(index), messages=validate_messages(item, where=f"conversation {index}"))


class MoA:
    """A loaded recipe: engines up, ready to run. Use as a context manager to shut the engines down."""

    def __init__(self, recipe: Recipe, runner: Runner, *, backend: str, plan: Plan | None = None,
                 schedule: Schedule | None = None, window: int | None = None) -> None:
        self.recipe = recipe
        self.backend = backend
        self.runner = runner
        self.plan = plan
        """The placement the engines run under (None when a runner was passed in or the engines run on Ray)."""
        self.pipeline = MoAPipeline(recipe, runner, schedule=schedule, window=window)

    def run(self, prompts: Sequence[PromptLike], *, listener: Listener | None = None) -> list[Result]:
        """Run a batch: each item a prompt string, a messages list, or a Conversation. Results keep the order.
        ``listener`` gets every role's start/done events (scheduler.RoleEvent) as they happen."""
        conversations = [to_conversation(p, i) for i, p in enumerate(prompts)]
        return self.pipeline.run(conversations, listener=listener)

    def stream(self, prompt: PromptLike, *, listener: Listener | None = None) -> Streamed:
        """Run one conversation; iterate the returned object for the aggregator's answer as it is written, then
        call its ``result()`` for the trace."""
        return self.pipeline.stream(to_conversation(prompt, 0), listener=listener)

    def close(self) -> None:
        self.runner.close()

    def __enter__(self) -> MoA:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def start_engines(
    recipe: Recipe,
    *,
    backend: str,
    ray_address: str | None = None,
    gpus: str | None = None,
    nodes: str | None = None,
    cpu_memory: str | None = None,
    cpu_cores: int | None = None,
    log: Callable[[str], None] | None = None,
) -> tuple[Runner, Plan | None]:
    """The one door to engines (``load``, ``eval``, ``serve`` and ``chat`` all come through it): on a Ray cluster
    (``ray_address``, else the recipe's ``cluster.address``) the RayRunner plans on the cluster's resources;
    locally the recipe is planned on the hardware (``gpus``/``nodes``/``cpu_memory``/``cpu_cores`` as in
    `moa-local plan`, the rest detected) and refused with PlacementError before anything loads if it cannot fit,
    then started as the plan says (its cores, GPUs, memory shares and sleep mode; phases when it needs several).
    Returns the runner and the plan (None on Ray)."""
    address = ray_address if ray_address is not None else recipe.cluster.address
    if address:
        if gpus or nodes or cpu_memory or cpu_cores:
            raise InputError("--gpus/--nodes/--cpu-memory/--cpu-cores plan local engines; on a Ray cluster the "
                             "cluster's own resources are planned. Drop them, or drop --ray-address.")
        from moa_local.cluster import RayRunner

        return RayRunner.for_recipe(recipe, backend=backend, address=address, log=log), None
    from moa_local.placement import build_hardware, plan_recipe
    from moa_local.placement.phases import start_runner

    hardware = build_hardware(gpus=gpus, nodes=nodes, cpu_memory=cpu_memory, cpu_cores=cpu_cores)
    plan = plan_recipe(recipe, hardware, backend=backend)
    return start_runner(recipe, plan, backend=backend, log=log), plan


def load(
    recipe: str | Path | Recipe,
    *,
    backend: str | None = None,
    max_tokens: int | None = None,
    temperature: float | None = None,
    seed: int | None = None,
    runner: Runner | None = None,
    ray_address: str | None = None,
    gpus: str | None = None,
    nodes: str | None = None,
    cpu_memory: str | None = None,
    cpu_cores: int | None = None,
    schedule: Schedule | None = None,
    window: int | None = None,
    log: Callable[[str], None] | None = None,
) -> MoA:
    """Load a recipe (a built-in name, a YAML path, or a Recipe) and start its engines (``start_engines``).

    ``backend`` overrides the recipe's (auto, vllm, transformers, fake); sampling overrides apply to every role.
    ``runner`` replaces the engines (tests). ``schedule`` (flow or stage) and ``window`` (conversations in flight)
    tune the scheduler; by default flow for resident plans, stage for phased ones."""
    rec = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    try:
        rec = override_sampling(rec, max_tokens=max_tokens, temperature=temperature, seed=seed)
    except ValidationError as exc:
        raise RecipeError(f"bad sampling override: {format_validation_error(exc)}") from None
    except ValueError as exc:
        raise RecipeError(f"bad sampling override: {exc}") from None
    chosen = resolve_backend(backend or rec.backend)
    plan = None
    if runner is None:
        runner, plan = start_engines(rec, backend=chosen, ray_address=ray_address, gpus=gpus, nodes=nodes,
                                     cpu_memory=cpu_memory, cpu_cores=cpu_cores, log=log)
    try:
        return MoA(rec, runner, backend=chosen, plan=plan, schedule=schedule, window=window)
    except BaseException:
        runner.close()
        raise
