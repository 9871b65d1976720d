"""The Ray backend's pure parts: placement groups derived from plans, the in-actor engine driver, core localizing,
and the missing-extra error. No Ray cluster starts here (tests/integration/test_ray_cluster.py starts one)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from moa_local.cluster.host import InProcessEngine, localize_cpu_threads
from moa_local.cluster.layout import ClusterLayout, derive_layout
from moa_local.config import load_recipe
from moa_local.config.recipe import EngineOptions, Recipe, Sampling
from moa_local.engines.base import Generation, Request, Usage
from moa_local.errors import MissingDependencyError, PlacementError, RecipeError
from moa_local.placement import build_hardware, plan_recipe
from moa_local.placement.hardware import Hardware


def _layout(recipe: str | Recipe, nodes: str | None = None, *, backend: str = "vllm", cores: int = 8,
            memory: str = "2TiB") -> tuple[ClusterLayout, Hardware]:
    rec = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    hw = build_hardware(nodes=nodes, gpus=None if nodes else "none", cpu_memory=memory, cpu_cores=cores, detect=False)
    plan = plan_recipe(rec, hw, backend=backend)
    return derive_layout(plan, rec, backend=backend, hardware=hw), hw


def _gpu_share_per_phase(layout: ClusterLayout, hw: Hardware) -> dict[tuple[int, int], float]:
    """(phase, global GPU) -> sum of GPU fractions the phase's engines ask of it."""
    used: dict[tuple[int, int], float] = {}
    for spec in layout.actors.values():
        group = layout.groups[spec.group]
        gpus = [i for i, b in enumerate(group.bundles) if b.get("GPU")]
        share = spec.num_gpus if not spec.ray_executor else float(spec.env["VLLM_RAY_PER_WORKER_GPUS"])
        for b in spec.bundles:
            assert b in gpus
            used[(spec.phase, spec.group * 1000 + b)] = used.get((spec.phase, spec.group * 1000 + b), 0.0) + share
    return used


def test_paper_moa_on_two_h100_nodes_gets_one_strict_pack_group_per_tensor_parallel_set() -> None:
    layout, hw = _layout("moa", "2x8xH100-80GB")
    assert len(layout.groups) == 4
    for group in layout.groups:
        assert group.strategy == "STRICT_PACK"
        assert group.bundles == [{"GPU": 1.0, "CPU": 1.0}] * 4
        assert len(set(group.bundle_nodes)) == 1 and group.bundle_nodes[0] in (0, 1)
    assert sum(len(g.bundles) for g in layout.groups) == 16  # no GPU reserved twice
    for spec in layout.actors.values():
        assert spec.options.tensor_parallel_size == 4
        assert spec.ray_executor and spec.options.distributed_executor_backend == "ray"
        assert spec.num_gpus == 0 and spec.num_cpus == 0  # vLLM's workers hold the GPUs, not the host actor
        assert spec.env["VLLM_RAY_BUNDLE_INDICES"] == "0,1,2,3"
        assert spec.options.gpu_memory_utilization is not None and spec.options.max_model_len
    assert sorted(m for p in layout.phases for m in p) == sorted(load_recipe("moa").model_ids())
    assert all(v <= 1.0 for v in _gpu_share_per_phase(layout, hw).values())


def test_engines_spanning_nodes_use_pack_and_vllms_ray_executor_and_overlapping_sets_merge() -> None:
    layout, hw = _layout("moa", "4x2xH100-80GB")
    spanning = [g for g in layout.groups if len(set(g.bundle_nodes)) > 1]
    assert spanning and all(g.strategy == "PACK" for g in spanning)
    # each bundle is pinned to the node its GPU is on
    for g in layout.groups:
        assert all(n is not None for n in g.bundle_nodes)
    gpu_sets = [set(range(len(g.bundles))) for g in layout.groups]
    assert sum(len(s) for s in gpu_sets) == sum(len(n.gpus) for n in hw.nodes)
    two = [s for s in layout.actors.values() if s.options.tensor_parallel_size == 2]
    assert two, "the 4x2 plan has a tp=2 engine sharing a group with tp=4 engines"
    group = layout.groups[two[0].group]
    assert len(group.bundles) == 4 and len(group.models) >= 2
    assert all(v <= 1.0 for v in _gpu_share_per_phase(layout, hw).values())


def test_small_engines_sharing_one_gpu_split_it_and_take_their_own_gpu_share() -> None:
    layout, _ = _layout("tiny", "2x2xH100-80GB")
    assert len(layout.groups) == 1 and layout.groups[0].bundles == [{"GPU": 1.0, "CPU": 1.0}]
    for spec in layout.actors.values():
        assert spec.num_gpus == 0.5 and not spec.ray_executor and spec.bundles == [0]
        assert 0 < (spec.options.gpu_memory_utilization or 0) < 0.9
        assert spec.options.distributed_executor_backend is None


def test_cpu_engines_get_a_cpu_bundle_per_engine_sized_by_their_core_binding() -> None:
    layout, _ = _layout("tiny", cores=2, memory="24GiB")
    assert [g.bundles for g in layout.groups] == [[{"CPU": 1.0}], [{"CPU": 1.0}]]
    threads = {m: s.options.cpu_threads for m, s in layout.actors.items()}
    assert threads == {"smollm2-135m-instruct": "0", "gemma3-270m": "1"}
    assert all(s.num_cpus == 1.0 and s.options.cpu_kvcache_gib == 1.0 for s in layout.actors.values())
    wide, _ = _layout("tiny", cores=8, memory="24GiB")
    assert sorted(g.bundles[0]["CPU"] for g in wide.groups) == [4.0, 4.0]


def test_fake_engines_get_one_cpu_each_and_custom_resources_pin_the_first_bundle() -> None:
    rec = Recipe.model_validate(
        {**load_recipe("fake").model_dump(), "cluster": {"resources": {"gemma3-270m": {"node2": 1}}}}
    )
    layout, _ = _layout(rec, backend="fake")
    bundles = {g.models[0]: g.bundles for g in layout.groups}
    assert bundles == {"smollm2-135m-instruct": [{"CPU": 1.0}], "gemma3-270m": [{"CPU": 1.0, "node2": 1.0}]}


def test_resources_for_an_unknown_model_are_a_recipe_error() -> None:
    rec = Recipe.model_validate({**load_recipe("fake").model_dump(), "cluster": {"resources": {"llama": {"x": 1}}}})
    with pytest.raises(RecipeError, match="llama"):
        _layout(rec, backend="fake")


def test_multi_gpu_engine_on_the_transformers_backend_is_refused_with_a_fix() -> None:
    with pytest.raises(PlacementError, match="vllm"):
        _layout("moa", "2x8xH100-80GB", backend="transformers")


def test_localize_keeps_a_binding_the_node_has_and_rebinds_one_it_lacks() -> None:
    opts = EngineOptions(cpu_threads="2-3")
    assert localize_cpu_threads(opts, [0, 1, 2, 3]).cpu_threads == "2-3"
    assert localize_cpu_threads(opts, [0, 1]).cpu_threads == "0-1"
    assert localize_cpu_threads(EngineOptions(cpu_threads="16-31"), list(range(8))).cpu_threads == "0-7"
    assert localize_cpu_threads(EngineOptions(), [0]).cpu_threads is None
    assert localize_cpu_threads(EngineOptions(cpu_threads="auto"), [0]).cpu_threads == "auto"


class _StepHost:
    """A scripted worker.py Host: answers after a few steps, streams word by word, records aborts."""

    def __init__(self) -> None:
        self.info: dict[str, Any] = {}
        self.due: list[tuple[int, int, str, Any]] = []  # (steps left, call id, kind, payload)
        self.aborted: list[int] = []
        self.closed = False

    def handle(self, op: str, call_id: int, payload: Any, reply: Any) -> None:
        if op == "abort":
            self.aborted.append(call_id)
            self.due = [d for d in self.due if d[1] != call_id]
            return
        if op == "generate":
            texts = [msgs[-1]["content"].upper() for msgs, _ in payload]
            result = [{"text": t, "error": None, "prompt_tokens": 1, "completion_tokens": 1, "seconds": 0.0,
                       "finish_reason": "stop"} for t in texts]
            self.due.append((3, call_id, "result", result))
        elif op == "stream":
            words = payload[0][-1]["content"].split()
            for i, w in enumerate(words):
                self.due.append((i + 1, call_id, "delta", w))
            self.due.append((len(words) + 1, call_id, "result", {"error": None}))
        elif op == "boom":
            raise ValueError("no such op")

    def busy(self) -> bool:
        return bool(self.due)

    def step(self, reply: Any) -> None:
        now = [d for d in self.due if d[0] <= 1]
        self.due = [(n - 1, c, k, p) for n, c, k, p in self.due if n > 1]
        for _, call_id, kind, payload in now:
            reply(kind, call_id, payload)

    def close(self) -> None:
        self.closed = True


def _to_gen(d: dict[str, Any]) -> Generation:
    return Generation(text=d["text"], usage=Usage(d["prompt_tokens"], d["completion_tokens"]), error=d["error"])


def _req(text: str) -> Request:
    return Request(messages=[{"role": "user", "content": text}], sampling=Sampling(max_tokens=8))


def test_in_process_engine_drives_a_host_until_its_answer_and_aborts_an_abandoned_stream() -> None:
    host = _StepHost()
    engine = InProcessEngine("m", host, to_generation=_to_gen)
    assert [g.text for g in engine.generate([_req("a b"), _req("c")])] == ["A B", "C"]
    assert "".join(engine.stream(_req("x y z"))) == "xyz"
    stream: Iterator[str] = engine.stream(_req("p q r s"))
    assert next(stream) == "p"
    stream.close()  # the caller walked away: the host is told to abort that call
    deadline = time.monotonic() + 5
    while not host.aborted and time.monotonic() < deadline:
        time.sleep(0.01)
    assert host.aborted and not host.due
    engine.close()
    assert host.closed
    (again,) = engine.generate([_req("again")])
    assert again.kind == "engine_down" and "closed" in (again.error or "")


def test_without_ray_a_ray_address_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import moa_local

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails as if it were not installed
    with pytest.raises(MissingDependencyError, match=r"moa-local\[ray\]"):
        moa_local.load("fake", ray_address="local")


def test_cli_without_ray_exits_with_the_extra_named() -> None:
    code = "import sys; sys.modules['ray'] = None; from moa_local.cli import main; main()"
    r = subprocess.run([sys.executable, "-c", code, "run", "--recipe", "fake", "--ray-address", "local", "hi"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 3, r.stderr
    assert "pip install 'moa-local[ray]'" in r.stderr and "Traceback" not in r.stderr
