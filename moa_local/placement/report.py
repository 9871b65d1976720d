"""Renders a Plan for people: a rich table (model, params, weights, KV, GPUs, TP, phase) and a time estimate.

Never computes placement (planner.py does) and never prints: callers hand the renderable to a rich Console.
"""

from __future__ import annotations

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from moa_local.placement.plan import EnginePlacement, Plan

_SWAP_WORDS = {
    "resident": "all engines resident",
    "sleep1": "vLLM sleep level 1 (weights parked in CPU RAM)",
    "sleep2": "vLLM sleep level 2 (weights reloaded from disk)",
    "reload": "engines restarted per phase",
    "mixed": "sleep where GPU memory allows, restart elsewhere",
    "none": "no engines (fake backend)",
}


def _where(engine: EnginePlacement) -> str:
    if engine.device == "cpu":
        return f"cpu [{engine.cpu_threads}]"
    if engine.device == "none":
        return "-"
    gpus = ",".join(str(g) for g in engine.gpus)
    return gpus if len(engine.nodes) <= 1 and engine.nodes in ([], [0]) else f"{gpus} (nodes {engine.nodes})"


def _seconds(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


def time_estimate(plan: Plan) -> str:
    """One line: phases, swap method, cold start and per-batch switching cost."""
    phases = f"{len(plan.phases)} phase{'s' if len(plan.phases) != 1 else ''}"
    line = f"{phases}, {_SWAP_WORDS[plan.swap]}. Cold start ≈ {_seconds(plan.initial_load_s)}"
    if plan.switches:
        line += f"; {plan.switches} phase switches per batch ≈ {_seconds(plan.switch_s)}"
    return line + "."


def render_plan(plan: Plan) -> RenderableType:
    """The plan as a rich renderable: one row per engine, then the time estimate and notes."""
    table = Table(
        title=f"Placement of '{plan.recipe}' ({plan.backend}) on {plan.hardware}", title_justify="left"
    )
    table.add_column("model")
    table.add_column("params", justify="right")
    table.add_column("weights GiB", justify="right")
    table.add_column("KV GiB", justify="right")
    table.add_column("KV tokens", justify="right")
    table.add_column("GPUs" if plan.device != "cpu" else "cores")
    table.add_column("TP", justify="right")
    table.add_column("util", justify="right")
    table.add_column("phase", justify="right")
    for e in plan.models:
        params = f"{e.params_b:.1f}B" if e.params_b >= 1 else f"{e.params_b * 1000:.0f}M"
        weights = f"{e.weights_gib:.1f}" + (f" {e.quantization}" if e.quantization else "")
        util = f"{e.memory_utilization:.3f}" if e.memory_utilization is not None else "-"
        table.add_row(
            e.id,
            params,
            weights,
            f"{e.kv_gib:.1f}",
            f"{e.kv_tokens:,}",
            _where(e),
            str(e.tensor_parallel_size) if e.device == "cuda" else "-",
            util,
            str(e.phase),
        )
    lines: list[RenderableType] = [table, Text(time_estimate(plan))]
    if len(plan.phases) > 1:
        order = " → ".join(f"{s.phase}" for s in plan.schedule)
        lines.append(Text(f"Phase order (layers, then aggregation): {order}", style="dim"))
    lines.extend(Text(note, style="dim") for note in plan.notes)
    return Group(*lines)
