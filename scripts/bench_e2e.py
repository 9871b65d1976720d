"""End-to-end benchmark: the 2-layer tiny recipe on 64 prompts, and the share of wall time spent outside the engines.

    flock /tmp/moa-heavy.lock .venv/bin/python scripts/bench_e2e.py

Scheduler overhead = wall time of ``MoA.run`` minus the time during which at least one engine ``generate`` call was
running (the union of their intervals: the engines of a layer run in parallel). It is what moa-local itself costs
between and around the engine calls: building requests, injecting references, retries, traces. Start-up is not
timed. Prints a table per stage and a final JSON line.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from typing import Any

QUESTIONS = (
    "Why is the sky blue?", "Give one reason to learn Python.", "What causes tides?", "How do bees make honey?",
    "Name a use of copper.", "Why do cats purr?", "What is a volcano?", "How does a lighthouse help ships?",
)


def union_seconds(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", default="tiny")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--backend", default=None, help="override the recipe's backend")
    args = ap.parse_args()

    import moa_local

    prompts = [f"{QUESTIONS[i % len(QUESTIONS)]} (question {i + 1})" for i in range(args.prompts)]
    intervals: list[tuple[float, float]] = []
    lock = threading.Lock()
    stages: dict[str, list[float]] = {}

    def progress(stage: str, done: int, total: int) -> None:
        now = time.perf_counter()
        stages.setdefault(stage, [now, now])[1] = now

    with moa_local.load(args.recipe, backend=args.backend) as moa:
        for engine in moa.runner.engines.values():  # time every generate call (wrapping the bound method)
            def timed(requests: Any, _inner: Any = engine.generate) -> Any:
                start = time.perf_counter()
                try:
                    return _inner(requests)
                finally:
                    with lock:
                        intervals.append((start, time.perf_counter()))

            engine.generate = timed  # type: ignore[method-assign]
        start = time.perf_counter()
        results = moa.run(prompts, progress=progress)
        wall = time.perf_counter() - start
        backend = moa.backend

    inside = union_seconds(intervals)
    tokens = sum(r.usage.completion_tokens for r in results)
    ok = sum(r.ok for r in results)
    print(f"# recipe {args.recipe} ({backend}), {len(prompts)} prompts, {ok} ok, {len(intervals)} engine calls\n")
    print("| stage | seconds |\n|---|---|")
    for stage, (a, b) in stages.items():
        print(f"| {stage} | {b - a:.2f} |")
    print(f"| **run (wall)** | {wall:.2f} |\n| inside engine generate calls | {inside:.2f} |")
    print(f"| outside the engines (scheduler overhead) | {wall - inside:.3f} ({100 * (wall - inside) / wall:.2f}%) |")
    print(f"\ngenerated tokens: {tokens} ({tokens / wall:.1f} tok/s end to end)\n")
    print(json.dumps({"wall_s": round(wall, 3), "engine_s": round(inside, 3),
                      "overhead_share": round((wall - inside) / wall, 5), "ok": ok, "tokens": tokens}))


if __name__ == "__main__":
    main()
