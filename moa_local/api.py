"""The public Python API: ``moa_local.load(recipe) -> MoA``; ``MoA.run([...]) -> [Result]``.

    with moa_local.load("tiny") as moa:
        result = moa.run(["What is the capital of France?"])[0]
        print(result.output)

Turns prompts into conversations, picks the backend, owns the runner's lifetime. The CLI and server call this.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from moa_local.config.recipe import Recipe, override_sampling
from moa_local.config.registry import load_recipe
from moa_local.engines import resolve_backend
from moa_local.errors import InputError, RecipeError
from moa_local.pipeline import Conversation, LayerRunner, MoAPipeline, Progress, Result
from moa_local.prompts import Message

if TYPE_CHECKING:
    from moa_local.placement import Plan

PromptLike = str | list[Message] | Conversation
ROLES = ("system", "user", "assistant")


def validate_messages(messages: Any, *, where: str = "messages") -> list[Message]:
    """Check a chat ``messages`` list: dicts with role in system/user/assistant and string content, ending with a
    user turn. Raises InputError naming the bad element."""
    if not isinstance(messages, list) or not messages:
        raise InputError(f"{where} must be a non-empty list of {{role, content}} objects")
    out: list[Message] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or set(m) - {"role", "content", "name"} or "role" not in m or "content" not in m:
            raise InputError(f"{where}[{i}] must be an object with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise InputError(f"{where}[{i}].role is '{m['role']}'; expected one of {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise InputError(f"{where}[{i}].content must be a string")
        out.append({"role": m["role"], "content": m["content"]})
    if out[-1]["role"] != "user":
        raise InputError(f"{where} must end with a user message, got '{out[-1]['role']}'")
    return out


def to_conversation(item: PromptLike, index: int) -> Conversation:
    if isinstance(item, Conversation):
        return item
    if isinstance(item, str):
        if not item.strip():
            raise InputError(f"prompt {index} is empty")
        return Conversation(id=str(index), messages=[{"role": "user", "content": item}])
    return Conversation(id=str(index), messages=validate_messages(item, where=f"conversation {index}"))


class MoA:
    """A loaded recipe: engines up, ready to run batches. Use as a context manager to shut the engines down."""

    def __init__(self, recipe: Recipe, runner: LayerRunner, *, backend: str) -> None:
        self.recipe = recipe
        self.backend = backend
        self.runner = runner
        self.pipeline = MoAPipeline(recipe, runner)
        self.plan: Plan | None = None
        """The placement the engines run under (None when a runner was passed in or the engines run on Ray)."""

    def run(self, prompts: Sequence[PromptLike], *, progress: Progress | None = None) -> list[Result]:
        """Run a batch: each item a prompt string, a messages list, or a Conversation. Results keep the order."""
        conversations = [to_conversation(p, i) for i, p in enumerate(prompts)]
        return self.pipeline.run(conversations, progress=progress)

    def stream(self, prompt: PromptLike, *, progress: Progress | None = None) -> Iterator[str]:
        """Run the layers for one conversation, then yield the aggregator's answer as it is written."""
        _, deltas = self.pipeline.stream(to_conversation(prompt, 0), progress=progress)
        return deltas

    def close(self) -> None:
        close = getattr(self.runner, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> MoA:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load(
    recipe: str | Path | Recipe,
    *,
    backend: str | None = None,
    max_tokens: int | None = None,
    temperature: float | None = None,
    seed: int | None = None,
    runner: LayerRunner | None = None,
    ray_address: str | None = None,
    gpus: str | None = None,
    nodes: str | None = None,
    cpu_memory: str | None = None,
    cpu_cores: int | None = None,
) -> MoA:
    """Load a recipe (a built-in name, a YAML path, or a Recipe) and start its engines.

    ``backend`` overrides the recipe's (auto, vllm, transformers, fake); sampling overrides apply to every role.
    ``runner`` replaces the engine pool (tests, the phased executor). ``ray_address`` (default: the recipe's
    ``cluster.address``) runs the engines as actors on a Ray cluster: 'auto', 'ray://host:10001' or 'local'.
    Run locally, the recipe is first planned on the hardware (``gpus``/``nodes``/``cpu_memory``/``cpu_cores`` as
    in `moa-local plan`, the rest detected): PlacementError before anything loads if it cannot fit; the plan's
    per-engine settings go to the engines; a plan of several phases runs on the phased executor."""
    rec = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    try:
        rec = override_sampling(rec, max_tokens=max_tokens, temperature=temperature, seed=seed)
    except (ValidationError, ValueError) as exc:
        raise RecipeError(f"bad sampling override: {exc}") from exc
    chosen = resolve_backend(backend or rec.backend)
    address = ray_address if ray_address is not None else rec.cluster.address
    if runner is None and address:
        if gpus or nodes or cpu_memory or cpu_cores:
            raise InputError("--gpus/--nodes/--cpu-memory/--cpu-cores plan local engines; on a Ray cluster the "
                             "cluster's own resources are planned. Drop them, or drop --ray-address.")
        from moa_local.cluster import RayRunner

        runner = RayRunner.for_recipe(rec, backend=chosen, address=address)
    plan = None
    if runner is None:  # plan before loading anything: refuse what cannot fit, then resident pool or phases
        from moa_local.placement import build_hardware, plan_recipe
        from moa_local.placement.phases import start_runner

        hardware = build_hardware(gpus=gpus, nodes=nodes, cpu_memory=cpu_memory, cpu_cores=cpu_cores)
        plan = plan_recipe(rec, hardware, backend=chosen)
        runner = start_runner(rec, plan, backend=chosen)
    moa = MoA(rec, runner, backend=chosen)
    moa.plan = plan
    return moa
