"""Run a recipe's engines on a Ray cluster: engines as Ray actors, placed by placement groups derived from the plan.

    runner = RayRunner.for_recipe(recipe, backend="vllm", address="auto")   # or moa_local.load(..., ray_address=...)

layout.py (pure: plan -> placement groups and actor specs), session.py (connect, probe the cluster's hardware),
host.py (what runs inside an engine's actor), ray.py (the LayerRunner: calls, phases, restarts).
Importing this package never imports ray; ray is needed only when a runner connects (the ``ray`` extra).
"""

from moa_local.cluster.layout import ActorSpec, ClusterLayout, GroupSpec, derive_layout
from moa_local.cluster.ray import RayRunner
from moa_local.cluster.session import RaySession, cluster_hardware, connect, require_ray

__all__ = [
    "ActorSpec",
    "ClusterLayout",
    "GroupSpec",
    "RayRunner",
    "RaySession",
    "cluster_hardware",
    "connect",
    "derive_layout",
    "require_ray",
]
