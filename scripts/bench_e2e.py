"""End to end: the flow schedule against the stage schedule on the same loaded engines, and against the reference
client flow (togethercomputer/MoA: one HTTP request per prompt per model, 16 client threads, proposers one after
another).

    flock /tmp/moa-heavy.lock .venv/bin/python scripts/bench_e2e.py --schedule both --prompts 64
    flock /tmp/moa-heavy.lock .venv/bin/python scripts/bench_e2e.py --schedule both --prompts 64 --reference

The tiny recipe on vLLM, greedy (temperature 0 for every role), the recipe's token budgets. Both schedules run on
the same engines, loaded once, one after the other (stage first). Measured per schedule: wall time of
``MoAPipeline.run``; per engine the busy time (at least one request in flight); the time during which no engine
was busy (moa-local's own share: building requests, injecting references, the worker round trip between a layer's
end and the next one's start); generated tokens. ``--reference`` then closes the engines, starts one OpenAI server
per model (vLLM's own, same core binding, same scheduler settings) and runs the same 2 layers + aggregator as the
reference client does, on the same token ids. Prints tables and a final JSON line with ``flow_over_stage``,
``busiest_engine_busy_share``, ``outputs_identical``, ``outside_engines_share`` (and ``flow_over_reference``).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

TOPICS = (
    "the moon", "volcanoes", "bread", "bees", "glaciers", "the printing press", "copper", "owls", "tides", "chess",
    "rainbows", "coffee", "sharks", "the Roman roads", "salt", "comets", "bamboo", "penguins", "paper", "thunder",
    "tea", "deserts", "the violin", "octopuses", "rice", "lighthouses", "magnets", "whales", "cheese", "bridges",
    "clouds", "maple trees",
)


def questions(n: int) -> list[str]:
    forms = ("Tell me one surprising fact about {}.", "Explain in two sentences how {} work or formed.")
    return [forms[(i // len(TOPICS)) % 2].format(TOPICS[i % len(TOPICS)]) for i in range(n)]


class Busy:
    """Wraps a runner's submit: the union of time during which any request was in flight."""

    def __init__(self, runner: Any) -> None:
        self.runner = runner
        self.inner = runner.submit
        self.lock = threading.Lock()
        self.in_flight = 0
        self.since = 0.0
        self.union = 0.0
        runner.submit = self.submit

    def submit(self, model_id: str, request: Any, *, on_done: Any, on_delta: Any = None) -> Any:
        with self.lock:
            if self.in_flight == 0:
                self.since = time.perf_counter()
            self.in_flight += 1

        def done(gen: Any) -> None:
            with self.lock:
                self.in_flight -= 1
                if self.in_flight == 0:
                    self.union += time.perf_counter() - self.since
            on_done(gen)

        return self.inner(model_id, request, on_done=done, on_delta=on_delta)


def run_schedule(moa: Any, schedule: str, prompts: list[str]) -> dict[str, Any]:
    from moa_local.pipeline import Conversation, MoAPipeline

    runner = moa.runner
    before = runner.usage()
    busy = Busy(runner)
    pipeline = MoAPipeline(moa.recipe, runner, schedule=schedule)  # type: ignore[arg-type]
    convs = [Conversation(str(i), [{"role": "user", "content": p}]) for i, p in enumerate(prompts)]
    start = time.perf_counter()
    results = pipeline.run(convs)
    wall = time.perf_counter() - start
    runner.submit = busy.inner
    after = runner.usage()
    engines = {m: {"busy_s": after[m]["busy_s"] - before.get(m, {}).get("busy_s", 0.0),
                   "requests": after[m]["requests"] - before.get(m, {}).get("requests", 0),
                   "tokens": after[m]["completion_tokens"] - before.get(m, {}).get("completion_tokens", 0)}
               for m in after}
    for e in engines.values():
        e["busy_share"] = e["busy_s"] / wall
    return {
        "schedule": schedule, "wall_s": wall, "window": pipeline.window, "engines": engines,
        "outside_s": wall - busy.union, "ok": sum(r.ok for r in results),
        "tokens": sum(r.usage.completion_tokens for r in results),
        "outputs": [(r.output, [[x.text for x in layer.responses] for layer in r.layers]) for r in results],
    }


# -- the reference client flow -------------------------------------------------------------------------------------


def run_reference(recipe: Any, plan: Any, prompts: list[str], *, clients: int, logdir: Path) -> dict[str, Any]:
    """One OpenAI server per model; per prompt (one of ``clients`` threads): layer 1 asks each proposer in turn,
    layer 2 likewise with the references, then the aggregator; every request one HTTP call, on our token ids."""
    import queue

    import bench_layer
    from openai import OpenAI
    from transformers import AutoTokenizer

    from moa_local.config import load_model_config
    from moa_local.models.prepare import require_prepared
    from moa_local.placement.phases import planned_options
    from moa_local.prompts import inject_references, render_prompt

    options = planned_options(recipe, plan)
    servers = {m: bench_layer.start_server(m, options[m], logdir / f"ref-{m}.log") for m in recipe.model_ids()}
    try:
        for m, (proc, port) in servers.items():
            bench_layer.wait_healthy(proc, port, logdir / f"ref-{m}.log")
        api = {m: OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=3, timeout=1200)
               for m, (_, port) in servers.items()}
        tokenizers = {m: AutoTokenizer.from_pretrained(require_prepared(load_model_config(m))) for m in servers}
        formats = {m: load_model_config(m).prompt_format for m in servers}

        def ask(role: Any, messages: list[dict[str, str]]) -> tuple[str, int]:
            rendered = render_prompt(messages, prompt_format=formats[role.model], tokenizer=tokenizers[role.model])
            ids = tokenizers[role.model](rendered.text, add_special_tokens=rendered.add_special_tokens)["input_ids"]
            stop = [*rendered.stop, *role.sampling.stop] or None
            r = api[role.model].completions.create(
                model=role.model, prompt=ids, max_tokens=role.sampling.max_tokens, temperature=0.0,
                extra_body={"stop": stop, "skip_special_tokens": True})
            return r.choices[0].text.strip(), (r.usage.completion_tokens if r.usage else 0)

        todo: queue.Queue[int] = queue.Queue()
        for i in range(len(prompts)):
            todo.put(i)
        outputs: list[Any] = [None] * len(prompts)
        tokens = [0]
        lock = threading.Lock()

        def client() -> None:
            while True:
                try:
                    i = todo.get_nowait()
                except queue.Empty:
                    return
                conv = [{"role": "user", "content": prompts[i]}]
                references: list[str] = []
                layers = []
                for _ in range(recipe.layers):
                    answers = []
                    for role in recipe.proposer_roles():  # one after another, as the reference does
                        text, n = ask(role, inject_references(conv, references, system_prompt=role.system_prompt))
                        answers.append(text)
                        with lock:
                            tokens[0] += n
                    layers.append(answers)
                    references = answers
                agg = recipe.aggregator_role()
                final, n = ask(agg, inject_references(conv, references, system_prompt=agg.system_prompt))
                with lock:
                    tokens[0] += n
                outputs[i] = (final, layers)

        threads = [threading.Thread(target=client) for _ in range(clients)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return {"wall_s": time.perf_counter() - start, "tokens": tokens[0], "outputs": outputs}
    finally:
        import os
        import signal
        import subprocess

        for proc, _ in servers.values():
            for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
                try:
                    os.killpg(proc.pid, sig)
                    proc.wait(wait)
                    break
                except ProcessLookupError:
                    break
                except subprocess.TimeoutExpired:
                    continue


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", default="tiny")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--schedule", choices=["flow", "stage", "both"], default="both")
    ap.add_argument("--backend", default=None, help="override the recipe's backend")
    ap.add_argument("--reference", action="store_true", help="also run the reference client flow (OpenAI servers)")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--logdir", type=Path, default=Path("/tmp/moa-bench-e2e"))
    args = ap.parse_args()
    args.logdir.mkdir(parents=True, exist_ok=True)

    import moa_local

    prompts = questions(args.prompts)
    schedules = ["stage", "flow"] if args.schedule == "both" else [args.schedule]
    rows: list[dict[str, Any]] = []
    with moa_local.load(args.recipe, backend=args.backend, temperature=0.0) as moa:
        recipe, plan, backend = moa.recipe, moa.plan, moa.backend
        for schedule in schedules:
            rows.append(run_schedule(moa, schedule, prompts))
            r = rows[-1]
            print(f"{schedule}: {r['wall_s']:.1f} s, {r['tokens']} tokens, {r['ok']} ok", flush=True)

    print(f"\n# recipe {args.recipe} ({backend}), {len(prompts)} prompts, greedy\n")
    print("| schedule | window | wall s | tokens | tok/s | " + " | ".join(f"{m} busy" for m in rows[0]["engines"])
          + " | no engine busy |")
    print("|---|---:|---:|---:|---:|" + "---:|" * len(rows[0]["engines"]) + "---:|")
    for r in rows:
        busy = " | ".join(f"{e['busy_s']:.1f} s ({e['busy_share']:.2f})" for e in r["engines"].values())
        print(f"| {r['schedule']} | {r['window']} | {r['wall_s']:.1f} | {r['tokens']} | {r['tokens'] / r['wall_s']:.1f} "
              f"| {busy} | {r['outside_s']:.2f} s ({100 * r['outside_s'] / r['wall_s']:.2f}%) |")
    by = {r["schedule"]: r for r in rows}
    summary: dict[str, Any] = {"prompts": len(prompts)}
    if "flow" in by:
        flow = by["flow"]
        summary["busiest_engine_busy_share"] = round(max(e["busy_share"] for e in flow["engines"].values()), 3)
        summary["outside_engines_share"] = round(flow["outside_s"] / flow["wall_s"], 4)
    if len(by) == 2:
        summary["flow_over_stage"] = round(by["flow"]["wall_s"] / by["stage"]["wall_s"], 3)
        same = by["flow"]["outputs"] == by["stage"]["outputs"]
        summary["outputs_identical"] = same
        if not same:
            diff = [i for i, (a, b) in enumerate(zip(by["flow"]["outputs"], by["stage"]["outputs"], strict=True))
                    if a != b]
            summary["differing_conversations"] = len(diff)
            print(f"\noutputs differ in {len(diff)} of {len(prompts)} conversations (first: {diff[:5]})")
    if args.reference:
        assert plan is not None
        ref = run_reference(recipe, plan, prompts, clients=args.clients, logdir=args.logdir)
        print(f"\n| reference client flow ({args.clients} threads, HTTP per request) | {ref['wall_s']:.1f} s | "
              f"{ref['tokens']} tokens | {ref['tokens'] / ref['wall_s']:.1f} tok/s |")
        if "flow" in by:
            summary["reference_over_flow"] = round(ref["wall_s"] / by["flow"]["wall_s"], 3)
            ours = [o[0] for o in by["flow"]["outputs"]]
            summary["reference_outputs_identical"] = sum(a == b[0] for a, b in zip(ours, ref["outputs"], strict=True))
    print()
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
