"""Recipes on a real (simulated two-node) Ray cluster: engines as actors on different nodes, outputs equal to the
local run, an actor killed mid-batch, a plan with two phases, GPU groups pinned to their nodes, and the tiny recipe
on the real vLLM engines. One cluster for the module; nothing of Ray is left running afterwards."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import moa_local
from moa_local.config import load_model_config, load_recipe
from moa_local.config.recipe import Recipe

ray = pytest.importorskip("ray", reason="ray is not installed: pip install 'moa-local[ray]'")

from moa_local.cluster import RayRunner  # noqa: E402
from moa_local.placement import build_hardware, plan_recipe  # noqa: E402
from moa_local.placement.plan import Phase, Step  # noqa: E402

pytestmark = pytest.mark.integration

PROMPTS = ["Why is the sky blue?", "Name a prime number.", "What is MoA?"]


def _ray_pids(marker: str) -> list[int]:
    """Live processes whose command line mentions ``marker`` (the cluster's temp dir)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            pids.append(int(entry.name))
    return pids


@pytest.fixture(scope="module")
def cluster() -> Iterator[SimpleNamespace]:
    from ray.cluster_utils import Cluster

    tmp = tempfile.mkdtemp(prefix="moa-ray-", dir="/tmp")  # short: Ray's socket paths have a length limit
    saved = {k: os.environ.get(k) for k in ("RAY_TMPDIR", "RAY_AUTH_MODE")}
    os.environ.update(RAY_TMPDIR=tmp, RAY_AUTH_MODE="disabled")
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        node2 = c.add_node(num_cpus=1, resources={"node2": 1})
        ray.init(address=c.address, log_to_driver=False, logging_level="ERROR")
        c.wait_for_nodes()
        yield SimpleNamespace(cluster=c, address=c.address, head=c.head_node.node_id, node2=node2.node_id)
    finally:
        ray.shutdown()
        c.shutdown()
        deadline = time.monotonic() + 10
        while _ray_pids(tmp) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = _ray_pids(tmp)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(tmp, ignore_errors=True)
        assert not left, f"Ray processes left after shutdown: {left}"


def _fake(**update: Any) -> Recipe:
    return Recipe.model_validate({**load_recipe("fake").model_dump(), **update})


def _texts(results: list[Any]) -> list[Any]:
    return [(r.output, [[x.text for x in layer.responses] for layer in r.layers]) for r in results]


def test_fake_recipe_runs_with_engines_on_two_nodes_and_matches_the_local_run(cluster: SimpleNamespace) -> None:
    rec = _fake(cluster={"resources": {"gemma3-270m": {"node2": 1}}})
    with moa_local.load(rec) as local:
        expected = local.run(PROMPTS)
        expected_stream = "".join(local.stream(PROMPTS[0]))
    runner = RayRunner.for_recipe(rec, backend="fake", address=cluster.address, log=lambda _m: None)
    with moa_local.load(rec, runner=runner) as moa:
        where = runner.where
        assert where["gemma3-270m"]["node_id"] == cluster.node2  # pinned by the custom resource
        assert where["smollm2-135m-instruct"]["node_id"] == cluster.head
        assert {w["pid"] for w in where.values()}.isdisjoint({os.getpid()})
        got = moa.run(PROMPTS)
        assert all(r.ok for r in got)
        assert _texts(got) == _texts(expected)
        assert "".join(moa.stream(PROMPTS[0])) == expected_stream
    assert not runner.actors and not _live_groups()


def _live_groups() -> list[str]:
    return [g["name"] for g in ray.util.placement_group_table().values() if g["state"] != "REMOVED"]


def test_actor_killed_mid_batch_is_restarted_and_every_conversation_is_answered(cluster: SimpleNamespace) -> None:
    rec = _fake(
        engines={"gemma3-270m": {"fake": {"latency_s": 1.2}}},
        cluster={"max_restarts": 1, "restart_timeout_s": 60},
    )
    with moa_local.load(rec) as local:
        expected = local.run(PROMPTS)
    runner = RayRunner.for_recipe(rec, backend="fake", address=cluster.address, log=lambda _m: None)
    with moa_local.load(rec, runner=runner) as moa:
        before = runner.where["gemma3-270m"]["pid"]
        killer = threading.Timer(0.5, lambda: ray.kill(runner.actors["gemma3-270m"], no_restart=False))
        killer.start()
        got = moa.run(PROMPTS)
        killer.join()
        after = runner.where["gemma3-270m"]
    assert runner.recoveries == {"smollm2-135m-instruct": 0, "gemma3-270m": 1}
    assert after["pid"] != before and after["restarted"]
    assert all(r.ok for r in got)
    assert all(resp.ok and resp.attempts == 1 for r in got for layer in r.layers for resp in layer.responses)
    assert _texts(got) == _texts(expected)  # nothing lost, nothing different


def test_actor_that_cannot_restart_leaves_recorded_failures_for_the_policy(cluster: SimpleNamespace) -> None:
    rec = _fake(
        engines={"gemma3-270m": {"fake": {"latency_s": 1.5}}},
        cluster={"max_restarts": 0, "restart_timeout_s": 20},
    )
    runner = RayRunner.for_recipe(rec, backend="fake", address=cluster.address, log=lambda _m: None)
    with moa_local.load(rec, runner=runner) as moa:
        killer = threading.Timer(0.5, lambda: ray.kill(runner.actors["gemma3-270m"], no_restart=False))
        killer.start()
        got = moa.run(PROMPTS[:2])
        killer.join()
    for r in got:
        assert r.ok and r.output  # min_proposers=1: smollm2 carried the layer
        gemma = [resp for layer in r.layers for resp in layer.responses if resp.model == "gemma3-270m"]
        assert gemma and all(not g.ok for g in gemma)
        assert "not restarted" in (gemma[0].error or "") and gemma[0].attempts == 2  # the policy retried once


def test_plan_with_two_phases_swaps_engines_and_gives_the_same_answers(cluster: SimpleNamespace) -> None:
    rec = _fake()
    hw = build_hardware(gpus="none", cpu_memory="8GiB", cpu_cores=2, detect=False)
    plan = plan_recipe(rec, hw, backend="fake")
    models = [dataclasses.replace(e, phase=0 if e.id == "smollm2-135m-instruct" else 1) for e in plan.models]
    plan = dataclasses.replace(
        plan,
        models=models,
        phases=[Phase(0, ["smollm2-135m-instruct"], "reload", 0.0, 0.0), Phase(1, ["gemma3-270m"], "reload", 0.0, 0.0)],
        schedule=[Step("propose", 1, 0, ["smollm2"]), Step("propose", 1, 1, ["gemma3"])],
    )
    with moa_local.load(rec) as local:
        expected = local.run(PROMPTS)
    runner = RayRunner(rec, backend="fake", plan=plan, log=lambda _m: None)
    with moa_local.load(rec, runner=runner) as moa:
        assert list(runner.actors) == ["smollm2-135m-instruct"]
        got = moa.run(PROMPTS)
        assert _texts(got) == _texts(expected)
        # the aggregator (smollm2, phase 0) ran last: only its phase is resident
        assert list(runner.actors) == ["smollm2-135m-instruct"] and len(_live_groups()) == 1


def test_gpu_groups_are_reserved_on_the_node_the_plan_names(cluster: SimpleNamespace) -> None:
    c = cluster.cluster
    gpu_nodes = [c.add_node(num_cpus=1, num_gpus=2) for _ in range(2)]
    try:
        c.wait_for_nodes()
        rec = _fake()
        hw = build_hardware(nodes="2x2xH100-80GB", cpu_memory="64GiB", cpu_cores=1, detect=False)
        plan = plan_recipe(rec.model_copy(update={"backend": "vllm"}), hw, backend="vllm")
        assert {tuple(e.nodes) for e in plan.models} == {(0,)}  # both small engines share GPU 0 of plan node 0
        target = gpu_nodes[1].node_id  # plan node 0 -> the second GPU node
        runner = RayRunner(rec, backend="fake", plan=plan, node_ids=[target, gpu_nodes[0].node_id],
                           log=lambda _m: None)
        with moa_local.load(rec, runner=runner) as moa:
            assert {w["node_id"] for w in runner.where.values()} == {target}
            assert all(r.ok for r in moa.run(PROMPTS[:1]))
            table = ray.util.placement_group_table()
            live = [g for g in table.values() if g["state"] == "CREATED"]
            assert [g["bundles"] for g in live] == [{0: {"GPU": 1.0, "CPU": 1.0}}]
    finally:
        for node in gpu_nodes:
            c.remove_node(node)


def _tiny_ready() -> str | None:
    if importlib.util.find_spec("vllm") is None:
        return "vllm is not installed"
    from moa_local.models import is_prepared

    missing = [m for m in ("smollm2-135m-instruct", "gemma3-270m") if not is_prepared(load_model_config(m))]
    return f"models not prepared: {missing} (run `moa-local models prepare`)" if missing else None


@pytest.mark.vllm
@pytest.mark.skipif(_tiny_ready() is not None, reason=str(_tiny_ready()))
def test_tiny_recipe_on_vllm_engines_on_two_nodes_matches_the_local_greedy_run(cluster: SimpleNamespace) -> None:
    tiny = load_recipe("tiny")
    engines = {m: {**o.model_dump(exclude_defaults=True), "cpu_threads": core}
               for (m, o), core in zip(tiny.engines.items(), ("0", "1"), strict=True)}
    rec = Recipe.model_validate({**tiny.model_dump(), "engines": engines})
    prompts = PROMPTS[:1]  # engine starts dominate (4 vLLM starts); one prompt still crosses both layers
    runner = RayRunner.for_recipe(rec, backend="vllm", address=cluster.address, log=lambda _m: None)
    with moa_local.load(rec, runner=runner, temperature=0.0, max_tokens=12) as moa:
        nodes = {m: w["node_id"] for m, w in runner.where.items()}
        assert set(nodes.values()) == {cluster.head, cluster.node2}  # one engine on each simulated node
        got = moa.run(prompts)
    with moa_local.load(rec, backend="vllm", temperature=0.0, max_tokens=12) as local:
        expected = local.run(prompts)
    assert all(r.ok for r in got) and all(r.output for r in got)
    assert _texts(got) == _texts(expected)
