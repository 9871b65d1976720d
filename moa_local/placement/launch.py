"""What a plan will start, exactly: per phase and engine, the worker's environment and vLLM's engine arguments.

Owns ``launch_spec(recipe, plan)`` (the data of ``moa-local plan --launch``) and its text rendering. It runs the same
functions the engines run (``placement.phases.planned_options``, ``engines.vllm.engine_kwargs`` and
``worker_env``), so what it prints is what a worker gets, before anyone waits for 400 GB of weights. Pure: imports
neither torch nor vllm, starts nothing.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from moa_local.config.recipe import Recipe
from moa_local.config.registry import load_model_config
from moa_local.placement.phases import planned_options
from moa_local.placement.plan import Plan

SHOWN_ENV = ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND")
"""Environment variables of a worker that decide where it runs (the rest are fixed and not placement)."""


def launch_spec(recipe: Recipe, plan: Plan) -> dict[str, Any]:
    """``{"recipe", "hardware", "phases": [{"index", "swap", "engines": [{"model", "gpus", "tensor_parallel_size",
    "swap", "env", "engine_args"}]}]}`` for ``recipe`` placed by ``plan`` (vLLM backend)."""
    from moa_local.engines.vllm import engine_kwargs, worker_env

    options = planned_options(recipe, plan)
    device = "cuda" if plan.device == "cuda" else "cpu"
    phases = []
    for phase in plan.phases:
        engines = []
        for model_id in phase.models:
            placed, opts = plan.engine(model_id), options[model_id]
            env = worker_env(opts)
            if device == "cuda":
                env = {k: v for k, v in env.items() if not k.startswith("VLLM_CPU_")}
            engines.append({
                "model": model_id,
                "gpus": list(placed.gpus),
                "tensor_parallel_size": placed.tensor_parallel_size,
                "swap": placed.swap,
                "env": {k: env[k] for k in SHOWN_ENV if k in env},
                "engine_args": engine_kwargs(load_model_config(model_id), opts, device=device),
            })
        phases.append({"index": phase.index, "swap": phase.swap, "engines": engines})
    return {"recipe": plan.recipe, "hardware": plan.hardware, "phases": phases}


def render_launch(spec: dict[str, Any]) -> str:
    """The launch spec as text: one block per phase, one line of environment and one of arguments per engine."""
    lines = [f"What '{spec['recipe']}' starts on {spec['hardware']}:"]
    for phase in spec["phases"]:
        lines.append(f"phase {phase['index']} ({phase['swap']}):")
        for e in phase["engines"]:
            env = " ".join(f"{k}={v}" for k, v in e["env"].items())
            args = ", ".join(f"{k}={v!r}" for k, v in e["engine_args"].items())
            lines.append(f"  {e['model']}: {env}")
            lines.append(f"    vllm.LLM({args})")
    return "\n".join(lines)


def print_launch(recipe: Recipe, plan: Plan, *, as_json: bool) -> None:
    """``moa-local plan --launch [--json]``: the launch spec on stdout."""
    spec = launch_spec(recipe, plan)
    sys.stdout.write((json.dumps(spec, indent=2) if as_json else render_launch(spec)) + "\n")
