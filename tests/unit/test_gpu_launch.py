"""What a GPU plan starts (issue 13): the worker environment and vLLM arguments a plan produces, `plan --launch`,
the published chat templates of every shipped model and the end-of-turn tokens. Pure; nothing starts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from moa_local.cluster.layout import derive_layout
from moa_local.config import list_model_ids, load_model_config, load_recipe
from moa_local.config.recipe import EngineOptions, Recipe
from moa_local.engines.vllm import (
    end_token_ids,
    engine_kwargs,
    engine_start_timeout_s,
    visible_devices,
    worker_env,
)
from moa_local.errors import EngineStartError, PlacementError
from moa_local.placement import build_hardware, plan_recipe
from moa_local.placement.launch import launch_spec
from moa_local.placement.phases import planned_options
from moa_local.prompts import fold_system, inject_references, render_prompt, vendored_chat_template

GIB = 1024**3


def with_all(recipe: Recipe, **options: object) -> Recipe:
    engines = {m: recipe.engine_options(m).model_copy(update=options) for m in recipe.model_ids()}
    return recipe.model_copy(update={"engines": engines})


# -- finding 1: the plan's GPUs reach the worker -----------------------------------------------------------------


def test_plan_gpus_become_cuda_visible_devices_mapped_through_the_parents(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    env = worker_env(EngineOptions(gpus=[4, 5, 6, 7]))
    assert env["CUDA_VISIBLE_DEVICES"] == "4,5,6,7" and env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert "CUDA_VISIBLE_DEVICES" not in worker_env(EngineOptions())  # CPU and Ray engines: no GPU list
    # the plan counts the GPUs this process sees: index 1 of "2,3,5,7" is physical GPU 3
    assert visible_devices([1, 3], parent="2,3,5,7") == "3,7"
    assert visible_devices([0], parent="GPU-aa,GPU-bb") == "GPU-aa"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "6,7")
    assert worker_env(EngineOptions(gpus=[1]))["CUDA_VISIBLE_DEVICES"] == "7"
    with pytest.raises(EngineStartError, match=r"GPUs \[2\], but CUDA_VISIBLE_DEVICES='6,7' shows this process 2"):
        worker_env(EngineOptions(gpus=[2]))


def test_the_plan_decides_gpus_batch_limits_and_always_a_utilization() -> None:
    recipe = load_recipe("moa")
    recipe = recipe.model_copy(update={"engines": {"dbrx-instruct": EngineOptions(gpus=[7])}})  # ignored: plan's
    plan = plan_recipe(recipe, build_hardware(gpus="8xH100-80GB", cpu_memory="2TiB", detect=False), backend="vllm")
    for model_id, opts in planned_options(recipe, plan).items():
        placed = plan.engine(model_id)
        assert opts.gpus == placed.gpus and len(placed.gpus) == placed.tensor_parallel_size
        kwargs = engine_kwargs(load_model_config(model_id), opts, device="cuda")
        assert kwargs["max_num_batched_tokens"] == 8192 and kwargs["max_num_seqs"] == 256  # not the card's default
        assert kwargs["gpu_memory_utilization"] == placed.memory_utilization
        assert kwargs["max_model_len"] == placed.min_context  # what the recipe needs, not the KV estimate
        assert placed.kv_tokens >= 1.2 * placed.min_context


def test_engine_arguments_awq_dtype_ray_backend_and_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    qwen = load_model_config("qwen1.5-72b-chat")
    assert engine_kwargs(qwen, EngineOptions(quantization="awq"), device="cuda")["dtype"] == "float16"
    assert engine_kwargs(qwen, EngineOptions(quantization="gptq"), device="cuda")["dtype"] == "float16"
    assert engine_kwargs(qwen, EngineOptions(quantization="fp8"), device="cuda")["dtype"] == "bfloat16"
    assert engine_kwargs(qwen, EngineOptions(quantization="awq", dtype="bfloat16"), device="cuda")["dtype"] == "bfloat16"
    ray = EngineOptions(tensor_parallel_size=4, distributed_executor_backend="ray")
    assert engine_kwargs(qwen, ray, device="cuda")["distributed_executor_backend"] == "ray"  # finding 7
    cpu = engine_kwargs(qwen, EngineOptions(max_num_seqs=8), device="cpu")
    assert "max_num_seqs" not in cpu and "gpu_memory_utilization" not in cpu


def test_on_ray_the_placement_group_decides_the_gpus_and_tp_engines_use_vllms_ray_executor() -> None:
    recipe = load_recipe("moa")
    hardware = build_hardware(nodes="2x8xH100-80GB", cpu_memory="2TiB", cpu_cores=64, detect=False)
    plan = plan_recipe(recipe, hardware, backend="vllm")
    layout = derive_layout(plan, recipe, backend="vllm", hardware=hardware)
    for spec in layout.actors.values():
        assert spec.options.gpus is None  # plan indices are global, the actor's CUDA indices are Ray's
        if spec.options.tensor_parallel_size > 1:
            assert spec.options.distributed_executor_backend == "ray" and spec.ray_executor


def test_start_timeout_grows_with_the_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MOA_LOCAL_ENGINE_START_TIMEOUT", raising=False)
    small = engine_start_timeout_s(load_model_config("smollm2-135m-instruct"), EngineOptions())
    big = engine_start_timeout_s(load_model_config("wizardlm-2-8x22b"), EngineOptions())
    assert small == 900 and big > 1200
    monkeypatch.setenv("MOA_LOCAL_ENGINE_START_TIMEOUT", "33")
    assert engine_start_timeout_s(load_model_config("wizardlm-2-8x22b"), EngineOptions()) == 33


# -- plan --launch: the "done when" -----------------------------------------------------------------------


def launch_checks(spec: dict[str, Any], plan: Any) -> None:
    hardware = {"8xH100-80GB": 85017755648, "8xA100-80GB": 84987740160, "4xH100-80GB": 85017755648,
                "1xH200-141GB": 143156 * 1024**2, "8xH200-141GB": 143156 * 1024**2}
    cuda = hardware[spec["_cards"]]
    for phase in spec["phases"]:
        claimed: dict[int, float] = {}
        for e in phase["engines"]:
            placed = plan.engine(e["model"])
            visible = e["env"]["CUDA_VISIBLE_DEVICES"].split(",")
            assert visible == [str(g) for g in placed.gpus] and len(visible) == e["tensor_parallel_size"]
            args = e["engine_args"]
            assert not (args.get("quantization") in ("awq", "gptq") and args["dtype"] == "bfloat16")
            assert args["max_model_len"] >= placed.min_context
            for g in placed.gpus:
                claimed[g] = claimed.get(g, 0) + args["gpu_memory_utilization"] * cuda + placed.context_bytes_per_gpu
        for other in plan.models:  # what sleeping engines of other phases keep
            if other.phase != phase["index"]:
                for g in other.gpus:
                    claimed[g] = claimed.get(g, 0) + other.asleep_gib_per_gpu * GIB
        assert max(claimed.values()) <= 0.95 * cuda, (phase["index"], max(claimed.values()) / cuda)


@pytest.mark.parametrize("recipe_name", ["moa", "moa-lite"])
@pytest.mark.parametrize("cards", ["8xH100-80GB", "8xA100-80GB", "4xH100-80GB", "1xH200-141GB"])
@pytest.mark.parametrize("quantization", [None, "fp8", "awq"])
def test_launch_spec_of_every_feasible_plan(recipe_name: str, cards: str, quantization: str | None,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    recipe = load_recipe(recipe_name)
    if quantization:
        recipe = with_all(recipe, quantization=quantization)
    try:
        plan = plan_recipe(recipe, build_hardware(gpus=cards, cpu_memory="1TiB", detect=False), backend="vllm")
    except PlacementError:
        assert cards == "1xH200-141GB" and quantization != "awq"
        return
    launch_checks({**launch_spec(recipe, plan), "_cards": cards}, plan)


def test_plan_launch_json_on_the_command_line() -> None:
    r = subprocess.run([sys.executable, "-c", "from moa_local.cli import main; main()", "plan", "--recipe", "moa",
                        "--gpus", "8xH100-80GB", "--cpu-memory", "2TiB", "--launch", "--json"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    spec = json.loads(r.stdout)
    engines = [e for p in spec["phases"] for e in p["engines"]]
    assert [p["index"] for p in spec["phases"]] == [0, 1, 2]
    assert sorted(e["model"] for e in engines) == sorted(load_recipe("moa").model_ids())
    assert all(set(e) >= {"model", "gpus", "env", "engine_args"} for e in engines)
    assert all(e["env"]["CUDA_VISIBLE_DEVICES"] == ",".join(map(str, e["gpus"])) for e in engines)
    text = subprocess.run([sys.executable, "-c", "from moa_local.cli import main; main()", "plan", "--recipe",
                           "moa", "--gpus", "8xH100-80GB", "--launch"], capture_output=True, text=True, timeout=120)
    assert "CUDA_VISIBLE_DEVICES=" in text.stdout and "vllm.LLM(" in text.stdout


def test_a_model_whose_context_is_too_short_is_named_at_plan_time() -> None:
    plan = plan_recipe(load_recipe("moa"), build_hardware(gpus="8xH100-80GB", cpu_memory="2TiB", detect=False))
    notes = [n for n in plan.notes if "llama-3-70b-instruct" in n]
    assert notes and "holds 8192 tokens, less than the 15360" in notes[0]
    assert "references trimmed, the longest cut first" in notes[0], "the note says what happens at run time"


# -- finding 2: references survive every shipped chat template ----------------------------------------------------

REFERENCES = ["REFERENCE-ONE says the sky scatters blue light.", "REFERENCE-TWO mentions Rayleigh."]

MIXTRAL_8X22B_2024_04_DEFAULT = (
    "{{bos_token}}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ ' [INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + ' ' + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
"""The 'default' template of Mixtral-8x22B-Instruct-v0.1's first published tokenizer_config.json (its 'tool_use'
variant silently drops a system message); the current one folds the system text in itself."""


def tokenizer_for(model_id: str, tmp: Path) -> Any:
    from transformers import AutoTokenizer

    from moa_local.gpusim.weights import make_weights

    return AutoTokenizer.from_pretrained(str(make_weights(load_model_config(model_id), tmp / model_id)))


@pytest.mark.parametrize("model_id", list_model_ids())
def test_every_shipped_models_layer_2_prompt_carries_its_references(model_id: str, tmp_path: Path) -> None:
    config = load_model_config(model_id)
    messages = inject_references([{"role": "user", "content": "Why is the sky blue?"}], REFERENCES)
    tokenizer = None
    if config.prompt_format == "chat_template":
        template = vendored_chat_template(model_id)
        assert template, f"vendor the published chat template of {model_id} under model_configs/chat_templates/"
        tokenizer = tokenizer_for(model_id, tmp_path)
    text = render_prompt(messages, prompt_format=config.prompt_format, tokenizer=tokenizer,
                         system_prompt=config.system_prompt).text
    assert all(ref in text for ref in REFERENCES) and "Why is the sky blue?" in text


def test_a_template_that_refuses_a_system_role_gets_the_references_in_the_first_user_turn(tmp_path: Path) -> None:
    tokenizer = tokenizer_for("mixtral-8x22b-instruct", tmp_path)
    tokenizer.chat_template = MIXTRAL_8X22B_2024_04_DEFAULT
    messages = inject_references([{"role": "user", "content": "Why is the sky blue?"}], REFERENCES)
    with pytest.raises(Exception, match="roles must alternate"):  # a leading system message breaks it
        render_prompt(messages, prompt_format="chat_template", tokenizer=tokenizer)
    text = render_prompt(messages, prompt_format="chat_template", tokenizer=tokenizer,
                         system_prompt=load_model_config("mixtral-8x22b-instruct").system_prompt).text
    assert text.startswith("<s> [INST] ") and all(ref in text for ref in REFERENCES)
    assert fold_system([{"role": "user", "content": "hi"}]) == [{"role": "user", "content": "hi"}]


# -- finding 11: end-of-turn tokens --------------------------------------------------------------------------------


def test_end_of_turn_ids_come_from_generation_config_and_the_model_config(tmp_path: Path) -> None:
    from moa_local.gpusim.weights import make_weights

    config = load_model_config("llama-3-70b-instruct")
    with_file = make_weights(config, tmp_path / "a")
    without = make_weights(config, tmp_path / "b", generation_config=False)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(without))
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    assert eot in end_token_ids(tok, without, config)  # from the model config's stop_tokens
    bare = config.model_copy(update={"stop_tokens": []})
    assert eot not in end_token_ids(tok, without, bare)  # what a folder without generation_config.json gave before
    assert eot in end_token_ids(tok, with_file, bare)  # vLLM reads generation_config.json itself
