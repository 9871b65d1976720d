"""Tensor parallelism through vLLM's Ray executor on the simulated GPU server: a local Ray with four simulated GPUs,
moa-local's Ray runner, engine actors that create the (stand-in) vLLM in their own process with
``distributed_executor_backend="ray"``, whose workers take the GPUs of the actor's placement-group bundles. The actors
ask Ray for no GPU, so their CUDA_VISIBLE_DEVICES is empty: without the Ray executor vLLM refuses TP > 1 there."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from moa_local.config import load_model_config
from moa_local.config.recipe import EngineOptions, Recipe, Role, Sampling
from moa_local.gpusim import ENV, STUB, Box
from moa_local.gpusim.weights import make_weights
from moa_local.pipeline import Conversation, MoAPipeline
from moa_local.placement import build_hardware, plan_recipe

ray = pytest.importorskip("ray", reason="ray is not installed: pip install 'moa-local[ray]'")

pytestmark = pytest.mark.integration

MODELS = ["qwen1.5-72b-chat", "llama-3-70b-instruct"]


@pytest.fixture
def local_ray(tmp_path: Path) -> Iterator[Box]:
    box = Box.create(tmp_path / "box", "4xH100-80GB")
    for model_id in MODELS:
        make_weights(load_model_config(model_id), tmp_path / "home" / "models" / model_id, quantization="awq")
    repo = str(Path(__file__).resolve().parents[2])
    env = {ENV: str(box.path), "MOA_LOCAL_HOME": str(tmp_path / "home"), "RAY_AUTH_MODE": "disabled",
           "RAY_TMPDIR": tempfile.mkdtemp(prefix="moa-ray-", dir="/tmp"),
           # the Ray workers (engine actors, vLLM's workers) import the stand-in vllm first
           "PYTHONPATH": os.pathsep.join([str(STUB), repo, os.environ.get("PYTHONPATH", "")])}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    ray.init(num_cpus=4, num_gpus=4, include_dashboard=False)
    try:
        yield box
    finally:
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_tensor_parallel_engines_on_ray_start_on_their_bundles_gpus(local_ray: Box) -> None:
    from moa_local.cluster import RayRunner

    box = local_ray
    greedy = Sampling(temperature=0.0, max_tokens=256)
    recipe = Recipe(name="tp-on-ray", layers=2, proposers=[Role(model=m, sampling=greedy) for m in MODELS],
                    aggregator=Role(model=MODELS[1], sampling=greedy),
                    engines={m: EngineOptions(quantization="awq", tensor_parallel_size=2) for m in MODELS})
    hardware = build_hardware(gpus="4xH100-80GB", cpu_memory="512GiB", cpu_cores=4, detect=False)
    plan = plan_recipe(recipe, hardware, backend="vllm")
    assert len(plan.phases) == 1 and all(e.tensor_parallel_size == 2 for e in plan.models)
    runner = RayRunner(recipe, backend="vllm", plan=plan, hardware=hardware, log=lambda _: None)
    try:
        results = MoAPipeline(recipe, runner).run(
            [Conversation("q", [{"role": "user", "content": "Why is the sky blue?"}])])
    finally:
        runner.close()
    assert all(r.ok for r in results), [r.error for r in results]
    starts = {e["engine"]: e for e in box.events("start")}
    assert set(starts) == set(MODELS)
    for e in starts.values():
        assert e["kwargs"]["distributed_executor_backend"] == "ray"
        assert len(e["gpus"]) == 2  # its two bundles' GPUs, as Ray assigned them
    a, b = (set(starts[m]["gpus"]) for m in MODELS)
    assert a.isdisjoint(b) == set(plan.engine(MODELS[0]).gpus).isdisjoint(plan.engine(MODELS[1]).gpus)
    assert not box.events("oom") and all(p <= c.total for p, c in zip(box.peaks(), box.cards, strict=True))
