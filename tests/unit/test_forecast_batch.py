"""`run --input` with a forecast: the line before the job, the forecast against the measured wall time at the end,
``forecast_wall_s`` in the summary JSON, and every way a forecast cannot be made without harming the run."""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from typer.testing import CliRunner

from moa_local.batch import BatchSummary
from moa_local.batch.forecast import BatchForecast, PendingForecast, start_forecast
from moa_local.cli import app
from moa_local.config import load_recipe
from moa_local.placement import build_hardware, plan_recipe
from moa_local.placement.calibration import Calibration, EngineCalibration, binding_cores, save_calibration
from moa_local.placement.forecast import forecast
from moa_local.placement.plan import Plan
from moa_local.placement.workload import bound_outputs


def _jsonl(path: Path, n: int) -> Path:
    path.write_text("".join(json.dumps({"id": i, "prompt": f"question {i} about rivers"}) + "\n" for i in range(n)))
    return path


def _tiny_cpu_plan() -> tuple[Any, Plan]:
    recipe = load_recipe("tiny").model_copy(update={"backend": "vllm"})
    hardware = build_hardware(gpus="none", cpu_memory="24GiB", cpu_cores=2, detect=False)
    return recipe, plan_recipe(recipe, hardware)


def _calibrate(home: Path, plan: Plan) -> None:
    """A calibration of every engine of ``plan`` (50 ms per step plus 5 ms per sequence) where load_calibration looks."""
    from moa_local.placement.calibration import calibration_path

    engines = [EngineCalibration(model=e.id, dtype=e.dtype, cores=binding_cores(e.cpu_threads),
                                 binding=e.cpu_threads or "", step_base_s=0.05,
                                 step_per_seq_s={"greedy": 0.005, "top_p": 0.005}, step_per_context_s=0.0,
                                 prefill_per_token_s=0.001, prefill_per_token_sq_s=0.0, fit_error=0.0)
               for e in plan.models]
    save_calibration(Calibration(machine={"measured": "2026-12-03"}, engines=engines), calibration_path())
    assert str(calibration_path()).startswith(str(home))


def _loaded(recipe: Any, plan: Plan | None, *, window: int = 8, schedule: str = "flow") -> Any:
    """What PendingForecast.finish reads of an api.MoA: its recipe, plan and pipeline (no engines)."""
    pipeline = SimpleNamespace(schedule=schedule, window=window)
    return SimpleNamespace(recipe=recipe, plan=plan, pipeline=pipeline)


def test_a_calibrated_cpu_job_is_forecast_under_the_runs_window_and_max_tokens(tmp_path: Path,
                                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOA_LOCAL_HOME", str(tmp_path))
    recipe, plan = _tiny_cpu_plan()
    _calibrate(tmp_path, plan)
    pending = start_forecast(recipe, _jsonl(tmp_path / "in.jsonl", 12), conversations=10, backend="vllm")
    short = recipe.model_copy(update={"proposers": [r.model_copy(update={"sampling": r.sampling.model_copy(
        update={"max_tokens": 8})}) for r in recipe.proposers]})
    got = pending.finish(_loaded(short, plan, window=4), timeout=60)
    assert got.reason is None and got.forecast is not None and got.run_s is not None and got.run_s > 0
    assert got.forecast.conversations == 10 and got.forecast.window == 4
    assert got.forecast.workload.outputs == bound_outputs(short), "the recipe as loaded (--max-tokens) bounds outputs"
    assert any(e.bottleneck for e in got.forecast.engines)


def test_an_uncalibrated_cpu_says_how_to_calibrate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOA_LOCAL_HOME", str(tmp_path))
    recipe, plan = _tiny_cpu_plan()
    got = start_forecast(recipe, _jsonl(tmp_path / "in.jsonl", 3), conversations=3, backend="vllm").finish(
        _loaded(recipe, plan), timeout=60)
    assert got.run_s is None and got.reason is not None and "--calibrate" in got.reason


def test_no_forecast_on_fake_or_ray_or_nothing_left_and_errors_become_reasons(tmp_path: Path) -> None:
    recipe, plan = _tiny_cpu_plan()
    src = _jsonl(tmp_path / "in.jsonl", 3)
    fake = start_forecast(recipe, src, conversations=3, backend="fake")
    assert fake._thread is None, "no tokenizer is loaded for the fake backend"
    assert fake.finish(_loaded(recipe, plan)).reason == "the fake backend has no speed model"
    assert start_forecast(recipe, src, conversations=0, backend="vllm").finish(_loaded(recipe, plan)).reason == \
        "nothing left to run"
    on_ray = start_forecast(recipe, src, conversations=3, backend="vllm").finish(_loaded(recipe, None), timeout=60)
    assert on_ray.run_s is None and "Ray" in (on_ray.reason or "")
    gone = start_forecast(recipe, tmp_path / "missing.jsonl", conversations=3, backend="vllm")
    assert "does not exist" in (gone.finish(_loaded(recipe, plan), timeout=60).reason or "")
    broken = start_forecast(recipe, src, conversations=3, backend="vllm", hardware=lambda: 1 / 0)
    assert "ZeroDivisionError" in (broken.finish(_loaded(recipe, plan), timeout=60).reason or "")


def test_a_slow_count_never_holds_the_job(tmp_path: Path) -> None:
    recipe, plan = _tiny_cpu_plan()
    pending = PendingForecast(recipe, _jsonl(tmp_path / "in.jsonl", 3), conversations=3, backend="vllm",
                              hardware=lambda: time.sleep(2))
    began = time.perf_counter()
    got = pending.finish(_loaded(recipe, plan), timeout=0.05)
    assert time.perf_counter() - began < 1.0 and got.run_s is None and "still being counted" in (got.reason or "")


def test_a_100k_line_input_is_forecast_in_one_pass_and_quickly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOA_LOCAL_HOME", str(tmp_path))
    recipe, plan = _tiny_cpu_plan()
    _calibrate(tmp_path, plan)
    src = tmp_path / "big.jsonl"
    with src.open("w") as fh:
        for i in range(100_000):
            fh.write(json.dumps({"id": i, "prompt": f"question {i}: " + "word " * (i % 50)}) + "\n")
    began = time.perf_counter()
    pending = start_forecast(recipe, src, conversations=100_000, backend="vllm")
    pending._thread.join(60)  # type: ignore[union-attr] - what runs while the engines load
    counted = time.perf_counter() - began
    began = time.perf_counter()
    got = pending.finish(_loaded(recipe, plan, window=106))
    played = time.perf_counter() - began
    assert got.run_s is not None and got.forecast is not None and got.forecast.conversations == 100_000
    assert played < 2.0, f"after the engines are up the forecast took {played:.1f} s"
    assert counted < 15.0, f"counting the prompts took {counted:.1f} s (runs while the engines load)"


def test_summary_line_and_json_set_the_wall_time_against_the_forecast() -> None:
    s = BatchSummary(total=64, ok=64, generated_tokens=25300, wall_s=556.3, forecast_wall_s=610.0)
    assert "in 556.3 s (45.5 tok/s; forecast 610 s, -9%)" in s.line()
    assert s.to_dict()["forecast_wall_s"] == 610.0
    none = BatchSummary(total=1, ok=1, wall_s=2.0)
    assert "forecast" not in none.line() and none.to_dict()["forecast_wall_s"] is None


def _run(args: list[str]) -> Any:
    return CliRunner().invoke(app, args)


def test_run_prints_the_forecast_first_and_against_the_wall_time_at_the_end(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    recipe, plan = _tiny_cpu_plan()
    workload = start_forecast(recipe, _jsonl(tmp_path / "w.jsonl", 4), conversations=4, backend="vllm")
    workload._thread.join(60)  # type: ignore[union-attr]
    speeds = dict.fromkeys(recipe.model_ids(), SimpleNamespace(
        max_batch=256, source="test", step_s=lambda batch, context: 0.01, prefill_s=lambda t, t2: 0.0))
    fc = forecast(recipe, plan, workload._result["workload"], speeds=speeds, window=8)  # type: ignore[arg-type]
    assert fc.run_s is not None
    seen: list[Any] = []

    def finish(self: PendingForecast, moa: Any, *, timeout: float = 2.0) -> BatchForecast:
        seen.append(moa)
        return BatchForecast(fc)

    monkeypatch.setattr(PendingForecast, "finish", finish)
    src, out, summary = _jsonl(tmp_path / "in.jsonl", 4), tmp_path / "out.jsonl", tmp_path / "summary.json"
    r = _run(["run", "-r", "fake", "-i", str(src), "-o", str(out), "--summary-json", str(summary)])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("forecast (answers at max_tokens): 4 conversations in ≈"))
    done = next(i for i, line in enumerate(lines) if line.startswith("done: 4 ok"))
    assert first < done and "bottleneck" in lines[first] and "0 swaps" in lines[first]
    assert f"forecast {fc.run_s:.0f} s, " in lines[done] and "%)" in lines[done]
    assert json.loads(summary.read_text())["forecast_wall_s"] == round(fc.run_s, 1)
    assert seen and seen[0].plan is not None, "the forecast is made on the plan the engines were started with"


def test_run_on_the_fake_backend_says_so_in_one_line_and_writes_null(tmp_path: Path) -> None:
    src, out, summary = _jsonl(tmp_path / "in.jsonl", 3), tmp_path / "out.jsonl", tmp_path / "summary.json"
    r = _run(["run", "-r", "fake", "-i", str(src), "-o", str(out), "--summary-json", str(summary)])
    assert r.exit_code == 0, r.output
    assert [line for line in r.output.splitlines() if "forecast" in line] == \
        ["no forecast: the fake backend has no speed model"]
    assert json.loads(summary.read_text())["forecast_wall_s"] is None
    again = _run(["run", "-r", "fake", "-i", str(src), "-o", str(out)])  # resumed: nothing left, nothing said
    assert again.exit_code == 0 and "forecast" not in again.output and "3 skipped" in again.output
