"""Model ids are ids, never paths, and `models prepare --force` deletes only inside moa-local's own cache."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from moa_local.config import load_model_config, load_recipe
from moa_local.config.model import ModelConfig
from moa_local.config.registry import model_configs_dir
from moa_local.errors import ModelConfigError, RecipeError
from moa_local.models import prepare

NOT_IDS = ["/some/dir/evil", "../evil", "..", ".hidden", "sub/evil", "evil\n", "Evil", "", "a b", "C:\\evil"]


def _evil_config(folder: Path) -> Path:
    """A valid model config outside model_configs/, as an attacker would plant it."""
    data = yaml.safe_load((model_configs_dir() / "smollm2-135m-instruct.yaml").read_text())
    data["id"] = "evil"
    path = folder / "evil.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("model", NOT_IDS)
def test_a_recipe_naming_a_path_as_its_model_is_refused(tmp_path: Path, model: str) -> None:
    planted = _evil_config(tmp_path)
    if model == "/some/dir/evil":
        model = str(planted.with_suffix(""))  # the path that used to load the planted config
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"proposers": [{"model": "smollm2-135m-instruct"}], "aggregator": {"model": model}}))
    with pytest.raises(RecipeError, match="is not a model id") as info:
        load_recipe(recipe)
    assert "\n" not in str(info.value), "one line, whatever the value"


@pytest.mark.parametrize("model", NOT_IDS)
def test_the_registry_never_reads_a_config_outside_its_folder(tmp_path: Path, model: str) -> None:
    planted = _evil_config(tmp_path)
    with pytest.raises(ModelConfigError, match="is not a model id") as info:
        load_model_config(str(planted.with_suffix("")) if model == "/some/dir/evil" else model)
    assert "\n" not in str(info.value)


def test_real_ids_still_load() -> None:
    assert load_model_config("smollm2-135m-instruct").id == "smollm2-135m-instruct"
    assert load_recipe("tiny").model_ids()


def _gguf_config(weights_path: Path | None) -> ModelConfig:
    data = yaml.safe_load((model_configs_dir() / "smollm2-135m-instruct.yaml").read_text())
    if weights_path is not None:
        data["weights"]["path"] = str(weights_path)
    return ModelConfig.model_validate(data)


def test_prepare_force_never_deletes_a_folder_outside_the_cache(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOA_LOCAL_HOME", str(tmp_path / "home"))
    precious = tmp_path / "my-weights"
    precious.mkdir()
    (precious / "keep.txt").write_text("mine")
    (precious / prepare.MARKER).write_text("{}")  # even a folder that looks prepared
    with pytest.raises(ModelConfigError, match="refusing to replace .*my-weights.*only inside its cache"):
        prepare.prepare_model(_gguf_config(precious), force=True, log=False)
    assert (precious / "keep.txt").read_text() == "mine"
    # a leftover temporary folder next to it is not deleted either
    shutil.rmtree(precious)
    leftover = tmp_path / ".my-weights.tmp"
    leftover.mkdir()
    (leftover / "keep.txt").write_text("mine")
    with pytest.raises(ModelConfigError, match="refusing to replace"):
        prepare.prepare_model(_gguf_config(precious), force=True, log=False)
    assert (leftover / "keep.txt").exists()


def test_prepare_may_replace_folders_inside_the_cache_but_not_through_a_link(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOA_LOCAL_HOME", str(tmp_path / "home"))
    config = _gguf_config(None)
    inside = prepare.model_path(config)
    inside.mkdir(parents=True)
    (inside / "old.bin").write_text("stale")
    prepare._remove(inside, config=config)
    assert not inside.exists()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("mine")
    inside.symlink_to(elsewhere)
    with pytest.raises(ModelConfigError, match="refusing to replace"):
        prepare._remove(inside, config=config)
    assert (elsewhere / "keep.txt").exists()
