from pathlib import Path

import pytest

from moa_local.config import list_model_ids, list_recipe_names, load_model_config, load_recipe
from moa_local.config.recipe import override_sampling
from moa_local.errors import ModelConfigError, RecipeError

BUILTIN = ["fake", "moa", "moa-lite", "self-moa", "tiny"]


@pytest.mark.parametrize("name", BUILTIN)
def test_builtin_recipes_load(name: str) -> None:
    assert name in list_recipe_names()
    r = load_recipe(name)
    assert r.layers >= 1 and r.proposers


def test_every_model_config_validates() -> None:
    ids = list_model_ids()
    assert {"smollm2-135m-instruct", "gemma3-270m"} <= set(ids)
    for mid in ids:
        assert load_model_config(mid).id == mid


def test_paper_recipe_shape() -> None:
    r = load_recipe("moa")
    assert r.layers == 3 and len(r.proposers) == 6 and r.aggregator.model == "qwen1.5-110b-chat"
    assert load_recipe("moa-lite").aggregator.model == "qwen1.5-72b-chat"


def test_tiny_has_two_proposer_roles_and_two_layers() -> None:
    r = load_recipe("tiny")
    assert len(r.proposer_roles()) >= 2 and r.layers == 2
    assert load_model_config("gemma3-270m").prompt_format == "transcript"


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def test_unknown_key_is_an_error(tmp_path: Path) -> None:
    p = _write(tmp_path, "proposers: [{model: gemma3-270m, temprature: 1}]\naggregator: {model: gemma3-270m}\n")
    with pytest.raises(RecipeError, match=r"proposers\.0\.temprature: unknown key"):
        load_recipe(p)


def test_unknown_model_lists_known_models(tmp_path: Path) -> None:
    p = _write(tmp_path, "proposers: [{model: gpt-5}]\naggregator: {model: gemma3-270m}\n")
    with pytest.raises(RecipeError, match="unknown model 'gpt-5'.*smollm2-135m-instruct"):
        load_recipe(p)


def test_bad_yaml_and_bad_values(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(_write(tmp_path, "proposers: [\n"))
    with pytest.raises(RecipeError, match="temperature"):
        load_recipe(_write(tmp_path, "proposers: [{model: gemma3-270m, sampling: {temperature: -1}}]\naggregator: {model: gemma3-270m}\n"))
    with pytest.raises(RecipeError, match="min_proposers=3 exceeds"):
        load_recipe(_write(tmp_path, "proposers: [{model: gemma3-270m}]\naggregator: {model: gemma3-270m}\npolicy: {min_proposers: 3}\n"))


def test_unknown_recipe_name_lists_builtins() -> None:
    with pytest.raises(RecipeError, match="unknown recipe 'nope'.*tiny"):
        load_recipe("nope")
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe("missing.yaml")


def test_samples_expand_to_roles_with_offset_seeds() -> None:
    roles = load_recipe("self-moa").proposer_roles()
    assert [r.name for r in roles] == [f"qwen2.5#{i}" for i in range(1, 7)]
    assert [r.sampling.seed for r in roles] == list(range(6))


def test_override_sampling_applies_to_every_role() -> None:
    r = override_sampling(load_recipe("self-moa"), max_tokens=7, temperature=0.0, seed=None)
    assert {x.sampling.max_tokens for x in [*r.proposers, r.aggregator]} == {7}
    assert {x.sampling.temperature for x in [*r.proposers, r.aggregator]} == {0.0}
    assert r.proposers[0].sampling.seed == 0  # None leaves it alone


def test_missing_model_config_is_clear() -> None:
    with pytest.raises(ModelConfigError, match="unknown model 'nope'"):
        load_model_config("nope")
