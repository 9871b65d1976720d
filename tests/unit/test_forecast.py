"""The job forecast: card catalog, throughput model, calibration fit and storage, workload counting, the schedule
simulation against hand-computed cases, and the `plan --prompts` CLI (instant, no torch or vllm)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from moa_local.config import Recipe, Role, Sampling, load_model_config, load_recipe
from moa_local.config.model import Architecture, ModelConfig
from moa_local.config.recipe import EngineOptions
from moa_local.errors import InputError
from moa_local.placement import Hardware, Plan, build_hardware, plan_recipe
from moa_local.placement.calibration import (
    Calibration,
    EngineCalibration,
    Point,
    binding_cores,
    fit,
    load_calibration,
    save_calibration,
)
from moa_local.placement.cards import CARD_PERF, card_perf, vllm_max_num_seqs
from moa_local.placement.forecast import forecast
from moa_local.placement.hardware import GIB, GpuSpec, card_spec
from moa_local.placement.plan import EnginePlacement
from moa_local.placement.throughput import CalibratedSpeed, Mode, roofline_speed, sampling_mode
from moa_local.placement.workload import Workload, bound_outputs, build_workload, measured_outputs


def hw(gpus: str, *, cpu: str = "2TiB", cores: int = 16) -> Hardware:
    return build_hardware(gpus=gpus, cpu_memory=cpu, cpu_cores=cores, detect=False)


@dataclass(frozen=True)
class FixedSpeed:
    """A decode step takes ``step`` seconds whatever the batch; a prefill ``prefill`` seconds per token."""

    step: float = 1.0
    prefill: float = 0.0
    max_batch: int = 256
    source: str = "fixed"

    def step_s(self, batch: Mapping[Mode, int], context: float) -> float:
        return self.step if sum(batch.values()) else 0.0

    def prefill_s(self, tokens: float, tokens_sq: float) -> float:
        return self.prefill * tokens


def workload_of(recipe: Recipe, n: int, *, prompt: int = 10, outputs: dict[tuple[int, str], float] | None = None) -> Workload:
    roles = [str(r.name) for r in [*recipe.proposer_roles(), recipe.aggregator_role()]]
    return Workload(conversations=n, base_tokens={r: [prompt] for r in roles}, reference_overhead=dict.fromkeys(roles, 0.0),
                    outputs=outputs or bound_outputs(recipe), prompt_source="test", output_source="test")


def cpu_plan(recipe: Recipe) -> Plan:
    return plan_recipe(recipe.model_copy(update={"backend": "vllm"}), hw("none", cpu="24GiB", cores=2))


# -- cards and the roofline -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "memory_gib", "expected"), [
    ("H100-80GB", 79.6, "H100-80GB"), ("NVIDIA H100 80GB HBM3", 79.6, "H100-80GB"), ("NVIDIA H100 PCIe", 79.6, "H100-PCIE"),
    ("NVIDIA H100 NVL", 93.6, "H100-94GB"), ("NVIDIA A100-SXM4-40GB", 40, "A100-40GB"), ("NVIDIA A100 80GB PCIe", 80, "A100-80GB-PCIE"),
    ("NVIDIA L40S", 45, "L40S-48GB"), ("NVIDIA L4", 22.5, "L4-24GB"), ("NVIDIA A10", 22.5, "A10-24GB"),
    ("NVIDIA GeForce RTX 4090", 24, "RTX4090-24GB"), ("NVIDIA RTX 6000 Ada Generation", 48, "RTX6000ADA-48GB"),
    ("NVIDIA RTX A6000", 48, "A6000-48GB"), ("Tesla T4", 15, "T4-16GB"),
])
def test_card_names_from_catalog_and_nvidia_smi(name: str, memory_gib: float, expected: str) -> None:
    assert card_perf(GpuSpec(name=name, memory_bytes=int(memory_gib * GIB))) is CARD_PERF[expected]


def test_every_catalog_card_has_performance_and_unknown_sizes_do_not() -> None:
    from moa_local.placement.hardware import CARD_CATALOG_MIB

    for name in CARD_CATALOG_MIB:
        assert card_perf(card_spec(name)) is not None, name
    assert card_perf(GpuSpec(name="24GiB", memory_bytes=24 * GIB)) is None
    assert vllm_max_num_seqs(card_spec("H100")) == 1024 and vllm_max_num_seqs(card_spec("A100-80GB")) == 256


def _engine(tp: int) -> EnginePlacement:
    return EnginePlacement(id="x", roles=[], phase=0, device="cuda", params_b=1, dtype="bfloat16", quantization=None,
                           weights_gib=0, kv_gib=0, kv_tokens=400_000, max_model_len=4096, min_context=0,
                           tensor_parallel_size=tp)


def test_roofline_reproduces_its_batch_one_calibration_point() -> None:
    """Qwen2.5-72B-Instruct bf16, TP 4 on A100-80GB, batch 1: 31.37 tok/s (Qwen2.5 speed benchmark, vLLM 0.6.3)."""
    qwen = ModelConfig(id="qwen2.5-72b", family="qwen2", hf_repo="Qwen/Qwen2.5-72B-Instruct", license="x",
                       architecture=Architecture(params_b=72.7, num_layers=80, hidden_size=8192, intermediate_size=29568,
                                                 num_attention_heads=64, num_kv_heads=8, head_dim=128,
                                                 vocab_size=152064, max_context=32768, attention_bias=True))
    speed = roofline_speed(_engine(4), qwen, EngineOptions(), CARD_PERF["A100-80GB"], max_batch=256)
    assert 1 / speed.step_s({"greedy": 1}, 1000) == pytest.approx(31.37, rel=0.05)


def test_roofline_is_bandwidth_bound_small_and_compute_bound_large() -> None:
    llama = load_model_config("llama-3-70b-instruct")
    h100 = roofline_speed(_engine(4), llama, EngineOptions(), CARD_PERF["H100-80GB"], max_batch=1024)
    a100 = roofline_speed(_engine(4), llama, EngineOptions(), CARD_PERF["A100-80GB"], max_batch=256)
    one, many = h100.step_s({"sample": 1}, 500), h100.step_s({"sample": 256}, 256 * 500)
    assert many > one and 256 / many > 50 / one  # batching pays: throughput per step grows
    assert a100.step_s({"sample": 1}, 500) > one  # less bandwidth, slower decode
    assert a100.prefill_s(1e5, 1e7) / h100.prefill_s(1e5, 1e7) == pytest.approx(989.4 / 312, rel=1e-6)


def test_moe_reads_more_experts_as_the_batch_grows() -> None:
    mixtral = roofline_speed(_engine(4), load_model_config("mixtral-8x22b-instruct"), EngineOptions(),
                             CARD_PERF["H100-80GB"], max_batch=1024)
    assert mixtral._expert_share(1) == pytest.approx(0.25) and mixtral._expert_share(64) > 0.99


def test_sampling_modes() -> None:
    assert sampling_mode(Sampling(temperature=0)) == "greedy"
    assert sampling_mode(Sampling(temperature=0.7, top_p=0.9)) == "top_p"
    assert sampling_mode(Sampling(temperature=0.7)) == "sample"


# -- calibration ------------------------------------------------------------------------------------------------


def _points(a: float, b: dict[str, float], c: float, alpha: float, beta: float, *,
            decode_shapes: tuple[tuple[int, int], ...] = ()) -> list[Point]:
    shapes = [(1, 50), (8, 50), (32, 50), (1, 600), (8, 600)]

    def prefill(batch: int, p: int) -> float:
        return 0.05 + batch * (alpha * p + beta * p * p)

    points = [Point("prefill", "greedy", batch, p, 1, 1, prefill(batch, p)) for batch, p in shapes]
    for mode, per_seq in b.items():
        for batch, p in shapes + list(decode_shapes):
            steps = 31
            step = a + per_seq * batch + c * batch * (p + steps / 2)
            points.append(Point("decode", mode, batch, p, 32, 32, prefill(batch, p) + steps * step))
    return points


def test_fit_recovers_known_coefficients() -> None:
    got = fit(_points(0.02, {"greedy": 0.002, "top_p": 0.03}, 1e-6, 2e-4, 1e-8))
    assert got["step_base_s"] == pytest.approx(0.02, rel=1e-3)
    assert got["step_per_seq_s"] == pytest.approx({"greedy": 0.002, "top_p": 0.03}, rel=1e-3)
    assert got["step_per_context_s"] == pytest.approx(1e-6, rel=1e-3)
    assert got["prefill_per_token_s"] == pytest.approx(2e-4, rel=1e-3) and got["fit_error"] < 1e-3


def test_a_decode_shape_without_its_own_prefill_point_subtracts_the_fitted_prefill() -> None:
    # calibration.py decodes 32 long prompts but prefills at most 8 of them: the decode's own prefill (about 4x that
    # of 32 short prompts) must come from the prefill fit, or its steps look slow and the context term swells
    got = fit(_points(0.02, {"top_p": 0.03}, 1e-6, 2e-3, 0.0, decode_shapes=((32, 600),)))
    assert got["step_per_context_s"] == pytest.approx(1e-6, rel=0.02)
    assert got["step_base_s"] == pytest.approx(0.02, rel=0.02) and got["fit_error"] < 0.01


def test_fit_never_returns_negative_coefficients() -> None:
    points = _points(0.02, {"greedy": 0.002}, 0.0, 2e-4, 0.0)
    points = [p if p.kind != "decode" or p.batch != 32 else Point(**{**p.__dict__, "seconds": p.seconds * 0.5}) for p in points]
    got = fit(points)
    assert min(got["step_base_s"], got["step_per_context_s"], *got["step_per_seq_s"].values()) >= 0


def test_calibration_round_trip_and_lookup(tmp_path: Path) -> None:
    entry = EngineCalibration(model="m", dtype="float32", cores=1, binding="0", step_base_s=0.01,
                              step_per_seq_s={"greedy": 0.001}, step_per_context_s=0.0, prefill_per_token_s=1e-4,
                              prefill_per_token_sq_s=0.0, fit_error=0.01, points=[Point("prefill", "greedy", 8, 50, 1, 1, 0.1)])
    path = save_calibration(Calibration(machine={"cpu": "x", "measured": "2026-12-03T10:00:00"}, engines=[entry]), tmp_path / "c.json")
    loaded = load_calibration(path)
    assert loaded is not None and loaded.engines == [entry]
    placed = EnginePlacement(id="m", roles=[], phase=0, device="cpu", params_b=0.1, dtype="float32", quantization=None,
                             weights_gib=0, kv_gib=1, kv_tokens=1000, max_model_len=1000, min_context=0, cpu_threads="1")
    speed = loaded.speed(placed)
    assert speed is not None and speed.step_s({"greedy": 2}, 0) == pytest.approx(0.012)
    assert loaded.speed(EnginePlacement(**{**placed.__dict__, "cpu_threads": "0-1"})) is None  # other core count
    other = Calibration(machine={"cpu": "x"}, engines=[EngineCalibration(**{**entry.__dict__, "step_base_s": 0.5})])
    assert [e.step_base_s for e in loaded.merge(other).engines] == [0.5]
    (tmp_path / "bad.json").write_text('{"format": 99}')
    with pytest.raises(InputError, match="calibrat"):
        load_calibration(tmp_path / "bad.json")


def test_binding_cores() -> None:
    assert (binding_cores("0"), binding_cores("0-3"), binding_cores("0,2"), binding_cores("0-1,4")) == (1, 4, 2, 3)


def test_calibrated_speed_borrows_a_missing_mode() -> None:
    speed = CalibratedSpeed(0.01, {"top_p": 0.05}, 0.0, 0.0, 0.0, source="t")
    assert speed.step_s({"sample": 2}, 0) == pytest.approx(0.11)


# -- workload ---------------------------------------------------------------------------------------------------


def test_workload_from_input_counts_each_role_and_samples_large_files(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"id": i, "prompt": "word " * (10 + i)}) + "\n" for i in range(50)))
    recipe = load_recipe("fake")
    wl = build_workload(recipe, input=src)
    assert wl.conversations == 50 and set(wl.base_tokens) == {"smollm2", "gemma3", "aggregator"}
    assert wl.base("gemma3", 40) > wl.base("gemma3", 0) > 0
    assert all(v > 0 for v in wl.reference_overhead.values())  # the aggregate prompt's own words
    assert wl.outputs == bound_outputs(recipe)
    assert build_workload(recipe, input=src, prompts=1000).conversations == 1000


def test_workload_needs_a_size() -> None:
    with pytest.raises(InputError, match="--prompts"):
        build_workload(load_recipe("fake"))


def test_outputs_measured_per_role_from_traces_and_split_from_totals(tmp_path: Path) -> None:
    recipe = load_recipe("fake")

    def response(role: str, tokens: int) -> dict[str, object]:
        return {"role": role, "model": "m", "text": "t", "error": None, "usage": {"completion_tokens": tokens}}

    traced = tmp_path / "traced.jsonl"
    lines = [{"id": i, "error": None, "usage": {"completion_tokens": 0}, "trace": {
        "layers": [{"index": k, "responses": [response("smollm2", 10 + i), response("gemma3", 30)]} for k in (1, 2)],
        "aggregator": response("aggregator", 20)}} for i in range(2)]
    lines.append({"id": 9, "error": "boom", "usage": {"completion_tokens": 999}})
    traced.write_text("".join(json.dumps(x) + "\n" for x in lines))
    outputs, source, samples = measured_outputs(recipe, traced)
    assert outputs[(1, "smollm2")] == 10.5 and outputs[(2, "gemma3")] == 30 and outputs[(3, "aggregator")] == 20
    assert "per role" in source and samples[(1, "smollm2")] == [10, 11]

    totals = tmp_path / "plain.jsonl"
    totals.write_text('{"id": 1, "error": null, "usage": {"completion_tokens": 96}}\n')
    outputs, source, samples = measured_outputs(recipe, totals)
    assert sum(outputs.values()) == pytest.approx(96) and "proportion" in source and samples == {}


def test_measured_lengths_are_replayed_and_let_the_flow_overlap_stages() -> None:
    """Answers of different lengths finish at different times, so under flow a conversation's next stage starts
    while others still write: the same mean lengths, spread out, finish sooner than all alike at the mean."""
    recipe = load_recipe("fake")
    plan = cpu_plan(recipe)
    speeds = {m: FixedSpeed(step=1.0) for m in recipe.model_ids()}
    same = workload_of(recipe, 16)
    spread = Workload(**{**same.__dict__, "output_samples": {k: [8, 120] for k in same.outputs}})
    assert sorted({spread.output_of(1, "gemma3", c) for c in range(16)}) == [8, 120]
    alike = forecast(recipe, plan, same, speeds=speeds, window=16)
    varied = forecast(recipe, plan, spread, speeds=speeds, window=16)
    assert alike.run_s is not None and varied.run_s is not None and varied.run_s < 3 * 120


# -- the simulation ---------------------------------------------------------------------------------------------


def test_flow_wall_is_the_critical_path_when_every_conversation_fits_at_once() -> None:
    recipe = load_recipe("fake")
    plan = cpu_plan(recipe)
    speeds = {m: FixedSpeed() for m in recipe.model_ids()}
    fc = forecast(recipe, plan, workload_of(recipe, 4), speeds=speeds, window=8)
    # each stage is 64 decode steps (a request's first token comes with its prefill: 64 steps of 1 s each)
    assert fc.schedule == "flow" and fc.run_s == pytest.approx(3 * 64)
    assert fc.wall_s == pytest.approx(fc.run_s + plan.initial_load_s)
    assert fc.engine_seconds == {"smollm2-135m-instruct": pytest.approx(192), "gemma3-270m": pytest.approx(128)}
    assert fc.bottleneck == "smollm2-135m-instruct" and fc.gpu_hours is None


def test_window_and_batch_cap_serialize_conversations() -> None:
    recipe = load_recipe("fake")
    plan = cpu_plan(recipe)
    speeds = {m: FixedSpeed(max_batch=1) for m in recipe.model_ids()}
    fc = forecast(recipe, plan, workload_of(recipe, 3), speeds=speeds, window=8)
    # smollm2 serves 3 x (layer 1, layer 2, aggregator) one at a time: 9 x 64 steps, never idle once started
    assert fc.engine_seconds["smollm2-135m-instruct"] == pytest.approx(9 * 64)
    assert fc.run_s == pytest.approx(9 * 64)


def test_stage_schedule_waits_at_every_step_and_respects_the_window() -> None:
    recipe = load_recipe("fake")
    plan = cpu_plan(recipe)
    speeds = {m: FixedSpeed() for m in recipe.model_ids()}
    fc = forecast(recipe, plan, workload_of(recipe, 4), speeds=speeds, schedule="stage", window=1)
    # window 1 conversation = 2 requests in flight per step (x the 2 proposers, as MoAPipeline.stage_window): layer
    # steps (8 requests over 2 engines) take 4 waves, the aggregator (4 requests) 2
    assert [s.step_seconds for s in fc.stages if s.engine == "smollm2-135m-instruct"] == [4 * 64, 4 * 64, 2 * 64]
    assert fc.run_s == pytest.approx(10 * 64)
    wider = forecast(recipe, plan, workload_of(recipe, 4), speeds=speeds, schedule="stage", window=2)
    assert wider.run_s == pytest.approx(5 * 64) and wider.window == 2


def test_prefill_and_kv_capacity_count() -> None:
    recipe = load_recipe("fake")
    plan = cpu_plan(recipe)
    speeds = {m: FixedSpeed(step=0.0, prefill=0.5) for m in recipe.model_ids()}
    fc = forecast(recipe, plan, workload_of(recipe, 2, prompt=10), speeds=speeds, window=8)
    smol = next(e for e in fc.engines if e.id == "smollm2-135m-instruct")
    # 6 requests on smollm2: prefills of 10 tokens in layer 1; layers 2 and 3 read both 64-token answers (128 more)
    assert smol.prefill_tokens == 2 * 10 + 2 * 138 + 2 * 138
    assert smol.engine_seconds == pytest.approx(0.5 * smol.prefill_tokens)


def test_long_jobs_are_extrapolated_at_the_steady_rate() -> None:
    recipe = load_recipe("fake")
    plan = cpu_plan(recipe)
    speeds = {m: FixedSpeed(step=0.01, prefill=1e-4, max_batch=16) for m in recipe.model_ids()}
    small = forecast(recipe, plan, workload_of(recipe, 700), speeds=speeds, window=32)
    big = forecast(recipe, plan, workload_of(recipe, 7000), speeds=speeds, window=32)
    assert any("extrapolated" in n for n in big.notes) and not any("extrapolated" in n for n in small.notes)
    assert big.run_s is not None and small.run_s is not None
    assert big.run_s / small.run_s == pytest.approx(10, rel=0.05)


def test_uncalibrated_cpu_keeps_token_counts_and_says_so() -> None:
    recipe = load_recipe("fake")
    plan = cpu_plan(recipe)
    fc = forecast(recipe, plan, workload_of(recipe, 5), calibration=None, window=8)
    assert fc.wall_s is None and not fc.calibrated and "uncalibrated" in fc.notes[0]
    assert sum(e.generated_tokens for e in fc.engines) == 5 * 5 * 64
    data = fc.to_dict()
    assert data["wall_s"] is None and data["engine_seconds"] == {"smollm2-135m-instruct": None, "gemma3-270m": None}


def test_gpu_forecast_of_a_phased_plan_swaps_per_phase_change_and_prices_gpu_hours() -> None:
    recipe = load_recipe("moa")
    hardware = hw("8xH100-80GB")
    plan = plan_recipe(recipe, hardware, backend="vllm")
    wl = workload_of(recipe, 200, prompt=60)
    fc = forecast(recipe, plan, wl, hardware=hardware, price_per_gpu_hour=2.0)
    assert fc.schedule == "stage" and fc.swaps == plan.switches > 0 and fc.swap_s == plan.switch_s
    assert fc.wall_s is not None and fc.gpu_hours == pytest.approx(fc.wall_s * 8 / 3600)
    assert fc.cost == pytest.approx(fc.gpu_hours * 2.0)
    steps = sum(s.step_seconds or 0 for s in {(s.stage, s.phase): s for s in fc.stages}.values())
    assert fc.run_s == pytest.approx(steps + fc.swap_s, rel=1e-6)
    assert {"wall_s", "gpu_hours", "engine_seconds", "run_s", "stages", "engines"} <= set(fc.to_dict())
    awq = plan_recipe(recipe.model_copy(update={"engines": {m: EngineOptions(quantization="awq") for m in recipe.model_ids()}}),
                      hardware, backend="vllm")
    assert forecast(recipe, awq, wl, hardware=hardware).schedule == "flow"


def test_gpu_forecast_needs_known_cards() -> None:
    recipe = Recipe(name="t", proposers=[Role(model="qwen2.5-7b-instruct")], aggregator=Role(model="qwen2.5-7b-instruct"))
    hardware = hw("2x24GiB")
    plan = plan_recipe(recipe, hardware, backend="vllm")
    with pytest.raises(InputError, match="no throughput data"):
        forecast(recipe, plan, workload_of(recipe, 10), hardware=hardware)


# -- the command line -------------------------------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    code = ("import sys; from moa_local.cli import main\n"
            "try:\n    main()\nfinally:\n"
            "    sys.stderr.write('HEAVY:' + ','.join(m for m in ('torch', 'vllm') if m in sys.modules))\n")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)


def test_plan_prompts_json_has_a_forecast_fast_without_torch_or_vllm() -> None:
    began = time.perf_counter()
    r = _cli("plan", "--recipe", "moa-lite", "--gpus", "8xA100-80GB", "--cpu-memory", "2TiB", "--prompts", "1000",
             "--prompt-tokens", "60", "--price-per-gpu-hour", "1.5", "--json")
    assert r.returncode == 0, r.stderr
    assert time.perf_counter() - began < 10  # generous for CI; the target is < 5 s
    assert r.stderr.rstrip().endswith("HEAVY:")
    data = json.loads(r.stdout)
    fc = data["forecast"]
    assert fc["wall_s"] > 0 and fc["gpu_hours"] > 0 and fc["cost"] == pytest.approx(fc["gpu_hours"] * 1.5, rel=1e-3)
    assert set(fc["engine_seconds"]) == {m["id"] for m in data["models"]}


def test_plan_renders_the_forecast_and_refuses_job_options_without_a_job() -> None:
    r = _cli("plan", "--recipe", "moa", "--gpus", "8xH100-80GB", "--cpu-memory", "2TiB", "--prompts", "10")
    assert r.returncode == 0, r.stderr
    assert "Forecast: 10 conversations" in r.stdout and "bottleneck" in r.stdout and "GPU-hours" in r.stdout
    r = _cli("plan", "--recipe", "moa", "--prompt-tokens", "5")
    assert r.returncode == 2 and "--prompts" in r.stderr


def test_a_window_smaller_than_the_bottleneck_can_hold_is_pointed_out() -> None:
    recipe = load_recipe("fake")
    plan = cpu_plan(recipe)
    speeds = {m: FixedSpeed(step=0.01) for m in recipe.model_ids()}
    narrow = forecast(recipe, plan, workload_of(recipe, 64), speeds=speeds, window=2)
    assert any("larger --window" in n for n in narrow.notes)
    wide = forecast(recipe, plan, workload_of(recipe, 64), speeds=speeds, window=64)
    assert not any("larger --window" in n for n in wide.notes)
    assert wide.run_s is not None and narrow.run_s is not None and wide.run_s < narrow.run_s / 4


def test_decode_step_read_from_the_token_stream_ignores_prefill_and_the_tail() -> None:
    from moa_local.placement.calibration import step_from_stamps

    # three requests start decoding 0.5 s apart (prefills), then a token every 0.1 s; the first finishes early
    stamps = [[i * 0.5 + k * 0.1 for k in range(20 - 3 * i)] for i in range(3)]
    stamps[0] = stamps[0][:1] + [t + 0.7 for t in stamps[0][1:]]  # a long first gap (its prefill) is ignored
    assert step_from_stamps(stamps) == pytest.approx(0.1)
    assert step_from_stamps([[0.0, 0.1], [5.0, 5.1]]) is None  # never all decoding at once


def test_stage_rows_carry_the_swap_into_their_phase() -> None:
    recipe = load_recipe("moa")
    hardware = hw("8xH100-80GB")
    plan = plan_recipe(recipe, hardware, backend="vllm")
    fc = forecast(recipe, plan, workload_of(recipe, 20, prompt=60), hardware=hardware)
    swaps = {(s.stage, s.phase): s.swap_in_s for s in fc.stages}
    assert sum(swaps.values()) == pytest.approx(plan.switch_s, abs=0.5)
    assert swaps[(1, plan.schedule[0].phase)] == 0.0
