"""Time to first token and total time, full vs chunked aggregation, on one recipe (default: tiny), through the chat
path (``pipeline.stream``, what `moa-local chat` calls) and through the OpenAI server (streamed HTTP, loopback).

    flock /tmp/moa-heavy.lock .venv/bin/python scripts/bench_ttft.py --backend vllm --runs 6

The engines start once; full and chunked share them, and each prompt runs full then chunked back to back so both
modes see the same machine state. Prints a markdown table (medians, and chunked/full ratios) and, as a rough proxy
of the quality cost, how similar the two modes' answers are (same prompts, same seeds). ``--json`` saves every
answer for reading.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

PROMPTS = [
    "Why is the sky blue?",
    "Give three tips for staying focused while studying.",
    "What is the difference between a virus and a bacterium?",
    "Explain what a hash table is.",
    "How do plants make their food?",
    "Why do we have seasons on Earth?",
    "What makes a good password?",
    "Describe how a bicycle works.",
]


def _chat_path(moa: Any, prompt: str) -> tuple[float, float, str]:
    from moa_local.pipeline import Conversation

    start = time.perf_counter()
    first = None
    text = ""
    for delta in moa.pipeline.stream(Conversation("bench", [{"role": "user", "content": prompt}])):
        if delta.strip() and first is None:
            first = time.perf_counter() - start
        text += delta
    total = time.perf_counter() - start
    return first if first is not None else total, total, text


def _server_path(client: Any, model: str, prompt: str) -> tuple[float, float, str]:
    start = time.perf_counter()
    first = None
    text = ""
    for chunk in client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}], stream=True):
        piece = chunk.choices[0].delta.content if chunk.choices else None
        if piece:
            if first is None and piece.strip():
                first = time.perf_counter() - start
            text += piece
    total = time.perf_counter() - start
    return first if first is not None else total, total, text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="tiny")
    parser.add_argument("--backend", default="vllm", help="vllm, transformers or fake")
    parser.add_argument("--runs", type=int, default=6, help="prompts per mode and path")
    parser.add_argument("--chunk-tokens", type=int, nargs="+", default=None,
                        help="one or more chunk sizes to compare with full (default: the recipe's chunk_tokens)")
    parser.add_argument("--json", type=Path, default=None, help="write every answer and timing here")
    args = parser.parse_args()

    from openai import OpenAI

    from moa_local.api import MoA, load
    from moa_local.config import load_recipe
    from moa_local.config.recipe import Sampling
    from moa_local.engines.base import Request
    from moa_local.server.background import BackgroundServer
    from moa_local.server.openai import create_app
    from moa_local.server.settings import ServerSettings

    base = load_recipe(args.recipe)
    chunks = args.chunk_tokens or [base.chunk_tokens]
    prompts = (PROMPTS * (args.runs // len(PROMPTS) + 1))[: args.runs]
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    with load(base.model_copy(update={"aggregation": "full"}), backend=args.backend) as full:
        load_s = time.perf_counter() - t0
        modes: dict[str, Any] = {"full": full}
        for chunk in chunks:
            recipe = full.recipe.model_copy(update={"aggregation": "chunked", "chunk_tokens": chunk})
            modes[f"chunked-{chunk}"] = MoA(recipe, full.runner, backend=full.backend)
        with contextlib.ExitStack() as stack:
            clients = {}
            for mode, moa in modes.items():
                url = stack.enter_context(BackgroundServer(create_app(moa, settings=ServerSettings())))
                clients[mode] = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=900)
            hello = [{"role": "user", "content": "Say hello."}]  # warm-up (engines, HTTP connections), not counted
            full.runner.run({m: [Request(hello, Sampling(max_tokens=4), "warm-up")] for m in full.recipe.model_ids()})
            for client in clients.values():
                client.models.list()
            for i, prompt in enumerate(prompts):
                for path in ("chat", "server"):
                    for mode in modes:
                        if path == "chat":
                            ttft, total, text = _chat_path(modes[mode], prompt)
                        else:
                            ttft, total, text = _server_path(clients[mode], base.name, prompt)
                        rows.append({"prompt": i, "path": path, "mode": mode, "ttft_s": ttft, "total_s": total,
                                     "text": text})
                        print(f"{path:6} {mode:7} prompt {i}: ttft {ttft:6.2f} s  total {total:6.2f} s  {len(text.split())} words",
                              flush=True)

    def med(path: str, mode: str, key: str) -> float:
        return statistics.median(r[key] for r in rows if r["path"] == path and r["mode"] == mode)

    print()
    print(f"recipe {base.name}, backend {args.backend}, {len(prompts)} prompts per cell, "
          f"engines loaded in {load_s:.0f} s, {platform.processor() or platform.machine()}, "
          f"load average at the end {os.getloadavg()[0]:.1f} (other work on the machine skews the numbers)")
    print()
    print("| path | mode | TTFT median (s) | total median (s) | TTFT chunked/full | total chunked/full |")
    print("|---|---|---|---|---|---|")
    for path in ("chat", "server"):
        for mode in modes:
            ratio = ""
            if mode != "full":
                per_prompt = [
                    (c["ttft_s"] / f["ttft_s"], c["total_s"] / f["total_s"])
                    for f in rows if f["path"] == path and f["mode"] == "full"
                    for c in rows if c["path"] == path and c["mode"] == mode and c["prompt"] == f["prompt"]
                ]
                ttft_ratio = statistics.median(p[0] for p in per_prompt)
                total_ratio = statistics.median(p[1] for p in per_prompt)
                ratio = f"{ttft_ratio:.2f} | {total_ratio:.2f}"
            else:
                ratio = "1 | 1"
            print(f"| {path} | {mode} | {med(path, mode, 'ttft_s'):.2f} | {med(path, mode, 'total_s'):.2f} | {ratio} |")

    print()
    full_vs_full = [
        difflib.SequenceMatcher(None, a["text"].split(), b["text"].split()).ratio()
        for a in rows if a["mode"] == "full" and a["path"] == "chat"
        for b in rows if b["mode"] == "full" and b["path"] == "server" and b["prompt"] == a["prompt"]
    ]
    print(f"answer similarity, word-level SequenceMatcher, median: full (chat) vs full (server) "
          f"{statistics.median(full_vs_full):.2f} (the noise floor: same mode, sampled proposers)")
    for mode in modes:
        if mode == "full":
            continue
        similar = [
            difflib.SequenceMatcher(None, f["text"].split(), c["text"].split()).ratio()
            for f in rows if f["mode"] == "full"
            for c in rows if c["mode"] == mode and c["path"] == f["path"] and c["prompt"] == f["prompt"]
        ]
        words = statistics.median(len(r["text"].split()) for r in rows if r["mode"] == mode)
        print(f"  {mode} vs full: {statistics.median(similar):.2f}; median words {words:.0f} "
              f"(full {statistics.median(len(r['text'].split()) for r in rows if r['mode'] == 'full'):.0f})")
    if args.json:
        args.json.write_text(json.dumps({"backend": args.backend, "chunks": chunks, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
