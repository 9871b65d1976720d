"""Benchmark: the same recipe batch on the local EnginePool and on a two-node simulated Ray cluster (one engine
per node, same core bindings), and how long a killed engine actor takes to come back.

    flock /tmp/moa-heavy.lock .venv/bin/python scripts/bench_ray.py --backend vllm --prompts 16 --max-tokens 32
    .venv/bin/python scripts/bench_ray.py --backend fake --prompts 64

Prints one JSON object: start and batch seconds for each side, their ratios, and the restart seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import threading
import time
from typing import Any


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", default="vllm", choices=["fake", "transformers", "vllm"])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=1, help="Batches timed on each side (the mean is reported).")
    args = parser.parse_args()

    tmp = tempfile.mkdtemp(prefix="moa-ray-bench-", dir="/tmp")
    os.environ.update(RAY_TMPDIR=tmp, RAY_AUTH_MODE="disabled")
    import ray
    from ray.cluster_utils import Cluster

    import moa_local
    from moa_local.cluster import RayRunner
    from moa_local.config import load_recipe
    from moa_local.config.recipe import Recipe

    base = load_recipe("tiny" if args.backend != "fake" else "fake")
    engines = {m: {**base.engine_options(m).model_dump(exclude_defaults=True), "cpu_threads": core}
               for m, core in zip(base.model_ids(), ("0", "1"), strict=True)}
    rec = Recipe.model_validate({**base.model_dump(), "backend": args.backend, "engines": engines,
                                 "cluster": {"max_restarts": 1}})
    prompts = [f"Question {i}: name one fact about the number {i}." for i in range(args.prompts)]
    sampling = {"temperature": 0.0, "max_tokens": args.max_tokens}
    out: dict[str, Any] = {"backend": args.backend, "prompts": args.prompts, "max_tokens": args.max_tokens}

    def timed_runs(moa: Any) -> tuple[float, list[Any]]:
        results: list[Any] = []
        start = time.perf_counter()
        for _ in range(args.repeats):
            results = moa.run(prompts)
        return (time.perf_counter() - start) / args.repeats, results

    # 1. Ray: two simulated nodes of one core each; one engine per node.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        ray.init(address=cluster.address, log_to_driver=False, logging_level="ERROR")
        cluster.wait_for_nodes()
        start = time.perf_counter()
        runner = RayRunner.for_recipe(rec, backend=args.backend, address=cluster.address, log=lambda _m: None)
        out["ray_start_s"] = round(time.perf_counter() - start, 2)
        with moa_local.load(rec, runner=runner, **sampling) as moa:
            moa.run(prompts[:1])  # warm-up
            out["ray_batch_s"], ray_results = timed_runs(moa)
            out["ray_nodes"] = len({w["node_id"] for w in runner.where.values()})
            victim = rec.proposer_roles()[-1].model
            before = runner.where[victim]["pid"]
            killed = time.perf_counter()
            ray.kill(runner.actors[victim], no_restart=False)
            done = threading.Event()

            def back() -> None:
                while not done.is_set():
                    try:
                        info = ray.get(runner.actors[victim].where.remote(), timeout=5)
                    except Exception:
                        time.sleep(0.1)
                        continue
                    if info["pid"] != before:
                        out["restart_s"] = round(time.perf_counter() - killed, 2)
                        done.set()

            waiter = threading.Thread(target=back, daemon=True)
            waiter.start()
            waiter.join(timeout=600)
            done.set()
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)

    # 2. Local: the resident EnginePool, same bindings.
    start = time.perf_counter()
    with moa_local.load(rec, backend=args.backend, **sampling) as moa:
        out["local_start_s"] = round(time.perf_counter() - start, 2)
        moa.run(prompts[:1])
        out["local_batch_s"], local_results = timed_runs(moa)

    out["ray_batch_s"] = round(out["ray_batch_s"], 3)
    out["local_batch_s"] = round(out["local_batch_s"], 3)
    out["batch_ratio_ray_over_local"] = round(out["ray_batch_s"] / out["local_batch_s"], 3)
    if out["local_start_s"] >= 0.01:
        out["start_ratio_ray_over_local"] = round(out["ray_start_s"] / out["local_start_s"], 3)
    out["same_outputs"] = [r.output for r in ray_results] == [r.output for r in local_results]
    out["all_ok"] = all(r.ok for r in ray_results + local_results)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
