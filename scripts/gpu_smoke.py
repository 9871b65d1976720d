"""A check of at most 10 minutes for a real GPU server with CUDA vLLM (`pip install -e '.[gpu]'`, models prepared):
what the simulated GPU server (moa_local/gpusim) cannot prove. Prints one JSON line; exit 0 when every check passed.

    .venv/bin/python scripts/gpu_smoke.py                 # the two tiny models (smollm2-135m-instruct, gemma3-270m)

1. pinned apart: on two GPUs, SmolLM2 on GPU 0 and Gemma-3 on GPU 1 (one GPU: skipped), each engine with the plan's
   options (CUDA_VISIBLE_DEVICES from ``gpus``); nvidia-smi must show each worker tree on its own GPU only;
2. co-located: both engines on GPU 0 at once, each with its planned ``gpu_memory_utilization`` (the second passes
   vLLM's start-up free-memory check only if the first left it room);
3. the estimate against vLLM's own log lines, per engine: ``Model loading took X GiB`` vs ``estimate_gpu``'s
   weights per GPU, ``Available KV cache memory: Y GiB`` vs ``kv_budget_bytes`` at its utilization;
4. sleep round trip: greedy answers equal before sleep(1)/wake_up and after sleep(2)/wake (weights reloaded).

Without CUDA or vllm it prints ``{"ok": null, "skipped": ...}`` and exits 0.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

MODELS = ("smollm2-135m-instruct", "gemma3-270m")
PROMPT = [{"role": "user", "content": "Name three primes and say why they are prime."}]
GIB = 1024**3


def _skip(why: str) -> int:
    print(json.dumps({"ok": None, "skipped": why}))
    return 0


def _gpu_pids() -> dict[int, set[str]]:
    """pid -> GPU uuids it holds memory on (nvidia-smi)."""
    out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,gpu_uuid", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=30).stdout
    held: dict[int, set[str]] = {}
    for line in out.splitlines():
        pid, uuid = (x.strip() for x in line.split(",")[:2])
        held.setdefault(int(pid), set()).add(uuid)
    return held


def _uuids() -> list[str]:
    out = subprocess.run(["nvidia-smi", "--query-gpu=uuid", "--format=csv,noheader"], capture_output=True,
                         text=True, timeout=30).stdout
    return [x.strip() for x in out.splitlines() if x.strip()]


def _log_numbers(path: str) -> dict[str, float]:
    text = Path(path).read_text(errors="replace")
    found: dict[str, float] = {}
    m = re.search(r"Model loading took ([\d.]+) GiB", text)
    if m:
        found["weights_gib_log"] = float(m.group(1))
    m = re.search(r"Available KV cache memory: ([\d.]+) GiB", text)
    if m:
        found["kv_gib_log"] = float(m.group(1))
    return found


def main() -> int:
    signal.alarm(600)  # at most 10 minutes, whatever hangs
    try:
        import torch
    except ImportError:
        return _skip("torch is not installed")
    if not torch.cuda.is_available():
        return _skip("no CUDA GPU")
    try:
        import vllm  # noqa: F401
    except ImportError:
        return _skip("vllm is not installed (pip install -e '.[gpu]')")

    from moa_local.config import load_model_config
    from moa_local.config.recipe import EngineOptions, Sampling
    from moa_local.engines.base import Request
    from moa_local.engines.vllm import VLLMEngine
    from moa_local.placement.hardware import detect_gpus
    from moa_local.placement.memory import estimate_gpu, kv_budget_bytes

    gpus = detect_gpus()
    uuids = _uuids()
    report: dict[str, Any] = {"gpus": [g.name for g in gpus], "checks": {}}
    request = Request(PROMPT, Sampling(temperature=0.0, max_tokens=48))

    def start(model_id: str, gpu: int, util: float) -> VLLMEngine:
        options = EngineOptions(gpus=[gpu], gpu_memory_utilization=util, max_model_len=2048, enforce_eager=True,
                                enable_sleep_mode=True, max_num_batched_tokens=2048, max_num_seqs=64)
        return VLLMEngine(load_model_config(model_id), options=options)

    def compare(engine: VLLMEngine, util: float, card_bytes: int) -> dict[str, Any]:
        config = engine.config
        est = estimate_gpu(config, engine.options, tensor_parallel_size=1)
        row: dict[str, Any] = {"weights_gib_est": round(est.weights_per_gpu / GIB, 3),
                               "kv_gib_est": round(kv_budget_bytes(est, gpu_memory_bytes=card_bytes,
                                                                   utilization=util) / GIB, 3)}
        row.update(_log_numbers(engine.worker.log_path))
        return row

    started = time.monotonic()
    engines: list[VLLMEngine] = []
    try:
        # 1. pinned apart
        if len(gpus) >= 2 and len(uuids) >= 2:
            engines = [start(MODELS[0], 0, 0.3), start(MODELS[1], 1, 0.3)]
            held = _gpu_pids()
            where = []
            for engine, uuid in zip(engines, uuids[:2], strict=True):
                on = set().union(*(held.get(pid, set()) for pid in engine.pids()))
                where.append(sorted(on))
                report["checks"].setdefault("pinned_apart", True)
                report["checks"]["pinned_apart"] &= on == {uuid}
            report["pinned_apart_uuids"] = where
            for e in engines:
                e.close()
            engines = []
        else:
            report["checks"]["pinned_apart"] = None
        # 2-4. co-located on GPU 0, estimates, sleep round trip
        card = gpus[0].cuda_bytes
        engines = [start(MODELS[0], 0, 0.35), start(MODELS[1], 0, 0.35)]
        report["checks"]["co_located_started"] = True
        report["estimates"] = {e.model_id: compare(e, 0.35, card) for e in engines}
        close = []
        for row in report["estimates"].values():
            for key in ("weights", "kv"):
                log, est = row.get(f"{key}_gib_log"), row[f"{key}_gib_est"]
                close.append(log is not None and abs(log - est) <= max(0.1 * log, 0.05))
        report["checks"]["estimates_within_10pct"] = all(close)
        same = True
        for e in engines:
            before = e.generate([request])[0].text
            e.sleep(1)
            e.wake_up()
            after1 = e.generate([request])[0].text
            e.sleep(2)
            e.wake_up()
            after2 = e.generate([request])[0].text
            same &= before == after1 == after2 and bool(before)
        report["checks"]["sleep_round_trip_same_greedy_answers"] = same
    except Exception as exc:  # report, never a traceback: one JSON line
        report["error"] = f"{type(exc).__name__}: {str(exc)[:800]}"
    finally:
        for e in engines:
            e.close()
    report["seconds"] = round(time.monotonic() - started, 1)
    checks = [v for v in report["checks"].values() if v is not None]
    report["ok"] = "error" not in report and bool(checks) and all(checks)
    print(json.dumps(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
