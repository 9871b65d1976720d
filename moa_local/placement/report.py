"""Renders a Plan for people: a rich table (model, params, weights, KV, GPUs, TP, phase) and a time estimate; and a
Forecast of a job on it (per stage and engine, per engine, the totals).

Never computes placement (planner.py does) and never prints: callers hand the renderable to a rich Console.
"""

from __future__ import annotations

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from moa_local.placement.forecast import Forecast
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


# -- forecasts (placement/forecast.py computes them) -------------------------------------------------------------


def _hours(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def _stage_name(stage: int, layers: int) -> str:
    return f"layer {stage}" if stage <= layers else "aggregator"


def forecast_summary(fc: Forecast) -> str:
    """One line: wall time (load, run, swaps), GPU-hours and cost, the bottleneck. For `run`'s start and end."""
    if fc.wall_s is None or fc.run_s is None:
        return (f"Forecast for {fc.conversations:,} conversations: uncalibrated (token counts only); "
                "run `moa-local plan --calibrate` once on this machine.")
    line = (f"Forecast for {fc.conversations:,} conversations ({fc.schedule} schedule): wall ≈ {_hours(fc.wall_s)} "
            f"(load {_hours(fc.load_s)}, run {_hours(fc.run_s)}")
    if fc.swaps:
        line += f" incl. {fc.swaps} swaps ≈ {_hours(fc.swap_s)}"
    line += ")"
    if fc.gpu_hours is not None:
        line += f"; {fc.gpu_hours:,.1f} GPU-hours on {fc.gpus} GPUs"
        if fc.cost is not None and fc.price_per_gpu_hour is not None:
            line += f" ≈ {fc.cost:,.2f} at {fc.price_per_gpu_hour:g} per GPU-hour"
    if fc.bottleneck:
        line += f"; bottleneck {fc.bottleneck}"
    return line + "."


def forecast_run_line(fc: Forecast) -> str:
    """One line for `run --input` before its job starts (engines up): the job's wall time, the bottleneck's
    engine time, the swaps, GPU-hours on GPUs. The uncalibrated case is for the caller (no times to show)."""
    if fc.run_s is None:
        return f"forecast for {fc.conversations:,} conversations: no engine speed known"
    bound = " (answers at max_tokens)" if fc.workload.output_source.startswith("max_tokens") else ""
    line = (f"forecast{bound}: {fc.conversations:,} conversations in ≈ {_hours(fc.run_s)} ({fc.schedule} "
            f"schedule, window {fc.window})")
    bottleneck = next((e for e in fc.engines if e.bottleneck), None)
    if bottleneck is not None and bottleneck.engine_seconds is not None:
        line += f"; bottleneck {bottleneck.id} busy ≈ {_hours(bottleneck.engine_seconds)}"
    line += f"; {fc.swaps} swap{'s' if fc.swaps != 1 else ''}"
    if fc.swaps:
        line += f" ≈ {_hours(fc.swap_s)}"
    if fc.gpus:
        hours = fc.run_s * fc.gpus / 3600
        line += f"; ≈ {hours:,.2f} GPU-hours on {fc.gpus} GPU{'s' if fc.gpus != 1 else ''}"
        if fc.price_per_gpu_hour is not None:
            line += f" ≈ {hours * fc.price_per_gpu_hour:,.2f}"
    return line


def render_forecast(fc: Forecast) -> RenderableType:
    """The forecast as a rich renderable: per stage and engine, per engine, then the totals and assumptions."""
    layers = max(s.stage for s in fc.stages) - 1 if fc.stages else 0
    known = fc.wall_s is not None
    stages = Table(title=f"Forecast: {fc.conversations:,} conversations of '{fc.recipe}', {fc.schedule} schedule, "
                         f"window {fc.window}", title_justify="left")
    for col in ("stage", "engine", "phase", "requests", "prefill tokens", "generated tokens", "engine-s"):
        stages.add_column(col, justify="left" if col in ("stage", "engine") else "right")
    if fc.schedule == "stage":
        stages.add_column("step s", justify="right")
        stages.add_column("swap in s", justify="right")
    for s in fc.stages:
        row = [_stage_name(s.stage, layers), s.engine, str(s.phase), f"{s.requests:,}", f"{s.prefill_tokens:,}",
               f"{s.generated_tokens:,}", f"{s.engine_seconds:,.0f}" if s.engine_seconds is not None else "-"]
        if fc.schedule == "stage":
            row.append(f"{s.step_seconds:,.0f}" if s.step_seconds is not None else "-")
            row.append(f"{s.swap_in_s:,.0f}" if s.swap_in_s else "")
        stages.add_row(*row)
    engines = Table(title="Per engine", title_justify="left")
    for col in ("engine", "requests", "prefill tokens", "generated tokens", "engine-s", "mean batch", "speed"):
        engines.add_column(col, justify="left" if col in ("engine", "speed") else "right")
    for e in fc.engines:
        name = f"[bold]{e.id}[/bold] (bottleneck)" if e.bottleneck else e.id
        engines.add_row(name, f"{e.requests:,}", f"{e.prefill_tokens:,}", f"{e.generated_tokens:,}",
                        f"{e.engine_seconds:,.0f}" if e.engine_seconds is not None else "-",
                        f"{e.mean_batch:.1f}" if e.mean_batch is not None else "-", e.speed)
    lines: list[RenderableType] = [stages, engines, Text(forecast_summary(fc))]
    if known and fc.fill_drain_s is not None:
        lines.append(Text(f"Pipeline fill and drain ≈ {_hours(fc.fill_drain_s)} beyond the steady rate.", style="dim"))
    lines.append(Text(f"Prompts: {fc.workload.prompt_source}. Outputs: {fc.workload.output_source}.", style="dim"))
    lines.extend(Text(note, style="dim") for note in [*fc.workload.notes, *fc.notes])
    return Group(*lines)
