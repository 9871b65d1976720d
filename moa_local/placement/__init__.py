"""Placement: how much memory each model needs, what hardware there is, and where every engine goes.

    plan_recipe(recipe, hardware, *, backend=None, models=None) -> Plan     (pure; raises PlacementError)
    detect_hardware() -> Hardware                                          (nvidia-smi, /proc, affinity)
    build_hardware(*, gpus=None, nodes=None, cpu_memory=None, cpu_cores=None, detect=True) -> Hardware
    parse_gpus("8xH100-80GB") -> list[GpuSpec];  parse_nodes("2x8xH100-80GB");  parse_memory("24GiB")
                                                                           (bad strings raise InputError)
    render_plan(plan) -> rich renderable;  time_estimate(plan) -> str
    start_runner(recipe, plan, *, backend) -> EnginePool | PhasedRunner   (the engines, as the plan says)
    PhasedRunner(plan, factory=, options=): a LayerRunner that swaps phases; planned_options(recipe, plan)

Nothing in this package imports torch or vllm.
"""

from moa_local.placement.hardware import (
    GpuSlot,
    GpuSpec,
    Hardware,
    NodeSpec,
    build_hardware,
    detect_hardware,
    parse_gpus,
    parse_memory,
    parse_nodes,
)
from moa_local.placement.phases import PhasedRunner, PhaseStats, planned_options, start_runner
from moa_local.placement.plan import EnginePlacement, Phase, Plan, Step
from moa_local.placement.planner import plan_recipe
from moa_local.placement.report import render_plan, time_estimate

__all__ = [
    "EnginePlacement",
    "GpuSlot",
    "GpuSpec",
    "Hardware",
    "NodeSpec",
    "Phase",
    "PhaseStats",
    "PhasedRunner",
    "Plan",
    "Step",
    "build_hardware",
    "detect_hardware",
    "parse_gpus",
    "parse_memory",
    "parse_nodes",
    "plan_recipe",
    "planned_options",
    "render_plan",
    "start_runner",
    "time_estimate",
]
