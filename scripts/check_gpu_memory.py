"""Compare the memory estimator with what torch.cuda allocates: the transformers backend on a CUDA GPU.

    .venv/bin/python scripts/check_gpu_memory.py                      # the two tiny models, bf16
    .venv/bin/python scripts/check_gpu_memory.py qwen2.5-7b-instruct --batch 8 --max-tokens 256

For each model: weights (torch.cuda.memory_allocated after load) against ``weight_bytes`` of the estimator, and the
peak of a batched greedy generation (torch.cuda.max_memory_allocated) against weights + the KV cache of the batch's
tokens (``kv_bytes_per_token`` x batch x (prompt + max_tokens)) + its float32 logits. Prints a table with the error of
each; exits 1 when one is off by more than --tolerance. Without CUDA it says so and exits 0 (skipped): the machine
this project is developed on has no GPU, so docs/placement.md records only the vLLM-CPU comparison.

The transformers backend allocates what it uses; vLLM preallocates its KV cache under gpu_memory_utilization, so for
vLLM on a GPU compare instead the "Model loading took X GiB" and "Available KV cache memory" lines of the engine log
with ``estimate_gpu``'s weights_per_gpu and ``kv_budget_bytes``.
"""

from __future__ import annotations

import argparse
import sys

PROMPT = "Write a short paragraph about the history of the bicycle."


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", default=["smollm2-135m-instruct", "gemma3-270m"])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--tolerance", type=float, default=0.10, help="Largest relative error accepted.")
    args = parser.parse_args()

    try:
        import torch
    except ImportError:
        print("skipped: torch is not installed")
        return 0
    if not torch.cuda.is_available():
        print("skipped: no CUDA GPU (torch.cuda.is_available() is False)")
        return 0

    from moa_local.config import load_model_config
    from moa_local.config.recipe import EngineOptions, Sampling
    from moa_local.engines.base import Request
    from moa_local.engines.transformers import TransformersEngine
    from moa_local.placement.memory import DTYPE_BYTES, GIB, count_params, kv_bytes_per_token, weight_bytes

    print(f"GPU: {torch.cuda.get_device_name(0)}; dtype {args.dtype}; batch {args.batch} x {args.max_tokens} tokens")
    print("| model | weights est GiB | allocated GiB | error | peak est GiB | max allocated GiB | error |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    worst = 0.0
    for model_id in args.models:
        config = load_model_config(model_id)
        arch = config.architecture
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        engine = TransformersEngine(config, options=EngineOptions(device="cuda", dtype=args.dtype))  # type: ignore[arg-type]
        try:
            loaded = torch.cuda.memory_allocated() - base
            sampling = Sampling(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
            requests = [Request([{"role": "user", "content": PROMPT}], sampling) for _ in range(args.batch)]
            gens = engine.generate(requests)
            peak = torch.cuda.max_memory_allocated() - base
        finally:
            engine.close()
        prompt_tokens = max(g.usage.prompt_tokens for g in gens)
        tokens = args.batch * (prompt_tokens + args.max_tokens)
        weights_est = weight_bytes(count_params(arch), dtype=args.dtype)  # type: ignore[arg-type]
        kv = kv_bytes_per_token(arch, kv_dtype_bytes=DTYPE_BYTES[args.dtype]) * tokens
        logits = args.batch * arch.vocab_size * 4
        peak_est = weights_est + kv + logits
        e1, e2 = loaded / weights_est - 1, peak / peak_est - 1
        worst = max(worst, abs(e1), abs(e2))
        print(f"| {model_id} | {weights_est / GIB:.3f} | {loaded / GIB:.3f} | {e1:+.1%} | {peak_est / GIB:.3f} | "
              f"{peak / GIB:.3f} | {e2:+.1%} |")
    print(f"worst error {worst:.1%} (tolerance {args.tolerance:.0%})")
    return 0 if worst <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
