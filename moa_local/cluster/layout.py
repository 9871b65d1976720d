"""Where a plan's engines live on a Ray cluster: placement groups (bundles, strategy, node pins) and, per engine,
the actor's resources and the options it starts with. Pure: never imports ray, never starts anything.

Derived from the placement planner's Plan (moa_local.placement):
  * GPU engines: one placement group per set of GPUs that engines share (overlapping sets merge), one bundle
    ``{"GPU": 1, "CPU": 1}`` per GPU, in global GPU order. ``STRICT_PACK`` when the set lies on one node (a
    tensor-parallel group never straddles machines), ``PACK`` when the plan spans nodes. Each bundle is pinned to its
    plan node when the runner knows which Ray node that is. Engines of one phase that share a GPU split it
    (``num_gpus = 1/k``; their memory shares come from the plan's ``gpu_memory_utilization``).
      - tensor_parallel_size 1: the host actor takes its GPU share from its bundle itself (Ray sets
        CUDA_VISIBLE_DEVICES); vLLM runs in-process.
      - tensor_parallel_size > 1: the actor takes nothing; vLLM's own Ray executor (``distributed_executor_backend
        ="ray"``) puts one worker on each of the engine's bundles (``VLLM_RAY_BUNDLE_INDICES``, share in
        ``VLLM_RAY_PER_WORKER_GPUS``); on one node or across nodes alike.
  * CPU engines: one group per engine, one bundle ``{"CPU": n}`` (n = cores of the plan's binding).
  * fake engines: one group per engine, ``{"CPU": 1}``.
Custom resources from the recipe's ``cluster.resources`` go into the engine's first bundle (node pinning by label).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from moa_local.config.recipe import EngineOptions, Recipe
from moa_local.engines.cpu import parse_cores
from moa_local.errors import PlacementError, RecipeError
from moa_local.placement.hardware import Hardware
from moa_local.placement.phases import planned_options
from moa_local.placement.plan import EnginePlacement, Plan

Strategy = Literal["STRICT_PACK", "PACK"]


@dataclass(frozen=True)
class GroupSpec:
    """One Ray placement group."""

    name: str
    bundles: list[dict[str, float]]
    strategy: Strategy
    models: list[str]
    """Engines that draw from this group (over all phases)."""
    bundle_nodes: list[int | None] = field(default_factory=list)
    """Per bundle, the plan node it must land on (None: wherever Ray finds room)."""


@dataclass(frozen=True)
class ActorSpec:
    """How one engine's host actor is placed and started."""

    model_id: str
    group: int
    """Index of its placement group in ``ClusterLayout.groups``."""
    bundle_index: int
    """The bundle the actor itself is scheduled in."""
    bundles: list[int]
    """Bundles of the engine's GPUs (vLLM's Ray workers, one each); [bundle_index] otherwise."""
    num_cpus: float
    num_gpus: float
    phase: int
    options: EngineOptions
    """The recipe's options completed from the plan (tensor parallelism, memory share, context, core binding)."""
    env: dict[str, str] = field(default_factory=dict)
    """Environment of the actor, set before the engine starts."""
    ray_executor: bool = False
    """vLLM runs its workers through its Ray executor inside this placement group (the actor hosts vLLM itself)."""


@dataclass(frozen=True)
class ClusterLayout:
    """A plan laid out as Ray placement groups and actors."""

    groups: list[GroupSpec]
    actors: dict[str, ActorSpec]
    phases: list[list[str]]
    """Model ids resident together, in the plan's phase order."""

    def phase_of(self, model_id: str) -> int:
        return self.actors[model_id].phase

    def groups_for(self, phase: int) -> list[int]:
        """Placement groups the engines of ``phase`` draw from."""
        return sorted({self.actors[m].group for m in self.phases[phase]})

    def to_dict(self) -> dict[str, Any]:
        return {
            "groups": [asdict(g) for g in self.groups],
            "actors": {
                m: {**asdict(a), "options": a.options.model_dump(exclude_defaults=True)} for m, a in self.actors.items()
            },
            "phases": self.phases,
        }


def _gpu_nodes(plan: Plan, hardware: Hardware | None) -> dict[int, int]:
    """Global GPU index -> plan node. From the hardware when known, else from each engine's nodes (a plan fills a
    multi-node engine's GPUs node by node, in global order)."""
    if hardware is not None:
        return {slot.index: slot.node for slot in hardware.slots()}
    out: dict[int, int] = {}
    for e in plan.models:
        if not e.gpus or not e.nodes:
            continue
        per_node = max(1, len(e.gpus) // len(e.nodes))
        for i, gpu in enumerate(sorted(e.gpus)):
            out.setdefault(gpu, e.nodes[min(i // per_node, len(e.nodes) - 1)])
    return out


def _merge_gpu_sets(engines: Sequence[EnginePlacement]) -> list[list[int]]:
    """Connected components of the engines' GPU sets (engines that share any GPU share a group), in GPU order."""
    parent: dict[int, int] = {}

    def find(x: int) -> int:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for e in engines:
        first = e.gpus[0]
        for g in e.gpus:
            parent[find(g)] = find(first)
    components: dict[int, list[int]] = {}
    for g in sorted(parent):
        components.setdefault(find(g), []).append(g)
    return sorted(components.values(), key=lambda gpus: gpus[0])


def _share(engine: EnginePlacement, plan: Plan) -> float:
    """The GPU fraction each of this engine's workers asks Ray for: 1/k, k = most engines of its phase on one of
    its GPUs. Rounded down to Ray's 4 decimals."""
    sharing = max(
        sum(1 for other in plan.models if other.phase == engine.phase and gpu in other.gpus) for gpu in engine.gpus
    )
    return int(10_000 / sharing) / 10_000


def cpu_count(binding: str | None) -> int:
    """Cores a plan's CPU binding uses ('0-3' -> 4); 1 when unset, 'auto' or 'nobind'."""
    if not binding:
        return 1
    try:
        cores = parse_cores(binding)
    except ValueError:
        return 1
    return max(1, len(cores))


def engine_options(planned: EngineOptions, engine: EnginePlacement, *, backend: str) -> EngineOptions:
    """The options an engine starts with: the plan's (``placement.phases.planned_options``: the recipe's, with the
    plan's decisions where the recipe left a value unset), plus vLLM's Ray executor for a multi-GPU vLLM engine,
    whose workers must take their GPUs from the placement group. The plan's GPU indices are dropped: on Ray the
    placement group decides the GPUs (Ray sets CUDA_VISIBLE_DEVICES per actor and per vLLM Ray worker), and plan
    indices are global over nodes, not the actor's CUDA indices."""
    if planned.gpus is not None:
        planned = planned.model_copy(update={"gpus": None})
    if (
        engine.device == "cuda"
        and backend == "vllm"
        and engine.tensor_parallel_size > 1
        and "distributed_executor_backend" not in planned.model_fields_set
    ):
        return planned.model_copy(update={"distributed_executor_backend": "ray"})
    return planned


def derive_layout(
    plan: Plan,
    recipe: Recipe,
    *,
    backend: str,
    hardware: Hardware | None = None,
    resources: Mapping[str, Mapping[str, float]] | None = None,
) -> ClusterLayout:
    """Lay ``plan`` (for ``recipe`` on ``backend``) out as placement groups and actor specs.

    ``resources`` (default: the recipe's ``cluster.resources``) adds custom Ray resources to an engine's first
    bundle. Raises RecipeError for resources naming an unknown model, PlacementError for a plan Ray cannot host."""
    extra = dict(recipe.cluster.resources if resources is None else resources)
    unknown = sorted(set(extra) - set(recipe.model_ids()))
    if unknown:
        raise RecipeError(
            f"cluster.resources names {unknown}, which no role uses; models of this recipe: {', '.join(recipe.model_ids())}"
        )
    planned = planned_options(recipe, plan)
    groups: list[GroupSpec] = []
    actors: dict[str, ActorSpec] = {}

    # 1. GPU engines: one group per connected set of GPUs.
    gpu_engines = [e for e in plan.models if e.device == "cuda" and e.gpus]
    node_of = _gpu_nodes(plan, hardware)
    for gpus in _merge_gpu_sets(gpu_engines):
        members = [e for e in gpu_engines if set(e.gpus) <= set(gpus)]
        nodes = [node_of.get(g) for g in gpus]
        bundles: list[dict[str, float]] = [{"GPU": 1.0, "CPU": 1.0} for _ in gpus]
        for e in members:
            first = gpus.index(min(e.gpus))
            for key, value in extra.get(e.id, {}).items():
                bundles[first][key] = max(bundles[first].get(key, 0.0), float(value))
        index = len(groups)
        groups.append(
            GroupSpec(
                name=f"moa-{recipe.name}-gpus-{gpus[0]}-{gpus[-1]}",
                bundles=bundles,
                strategy="STRICT_PACK" if len(set(nodes)) == 1 else "PACK",
                models=[e.id for e in members],
                bundle_nodes=nodes,
            )
        )
        for e in members:
            own = [gpus.index(g) for g in sorted(e.gpus)]
            share = _share(e, plan)
            options = engine_options(planned[e.id], e, backend=backend)
            tp = e.tensor_parallel_size
            if tp > 1 and backend != "vllm":
                raise PlacementError(
                    f"'{e.id}' is planned on {tp} GPUs; only the vllm backend runs one engine on several GPUs. "
                    f"Use backend: vllm, or set tensor_parallel_size: 1 for it in the recipe's engines."
                )
            ray_executor = tp > 1
            env = {"VLLM_RAY_BUNDLE_INDICES": ",".join(map(str, own)), "VLLM_RAY_PER_WORKER_GPUS": str(share)} if ray_executor else {}
            actors[e.id] = ActorSpec(
                model_id=e.id,
                group=index,
                bundle_index=own[0],
                bundles=own,
                num_cpus=0.0,
                num_gpus=0.0 if ray_executor else share,
                phase=e.phase,
                options=options,
                env=env,
                ray_executor=ray_executor,
            )

    # 2. CPU and fake engines: a group each.
    for e in plan.models:
        if e.id in actors:
            continue
        if e.device == "cuda":
            raise PlacementError(f"'{e.id}' is planned on CUDA but the plan gives it no GPUs; re-run the planner.")
        cpus = float(cpu_count(e.cpu_threads)) if e.device == "cpu" else 1.0
        bundle = {"CPU": cpus, **{k: float(v) for k, v in extra.get(e.id, {}).items()}}
        groups.append(
            GroupSpec(name=f"moa-{recipe.name}-{e.id}", bundles=[bundle], strategy="STRICT_PACK", models=[e.id],
                      bundle_nodes=[None])
        )
        actors[e.id] = ActorSpec(
            model_id=e.id,
            group=len(groups) - 1,
            bundle_index=0,
            bundles=[0],
            num_cpus=cpus,
            num_gpus=0.0,
            phase=e.phase,
            options=engine_options(planned[e.id], e, backend=backend),
        )

    missing = sorted(set(recipe.model_ids()) - set(actors))
    if missing:
        raise PlacementError(f"the plan places no engine for {missing}; plan the recipe '{recipe.name}' again")
    phases = [[m for m in p.models if m in actors] for p in plan.phases]
    return ClusterLayout(groups=groups, actors=actors, phases=phases)
