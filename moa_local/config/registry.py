"""Finds and validates model configs and recipes on disk. Turns pydantic errors into one-line fixes.

Search order for model configs: $MOA_LOCAL_MODEL_CONFIGS, then the project's model_configs/ folder.
Recipes: a YAML path, or a name under <model configs>/recipes/.
"""

from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from moa_local.config.model import MODEL_ID_PATTERN, ModelConfig
from moa_local.config.recipe import Recipe
from moa_local.errors import ModelConfigError, RecipeError


def model_configs_dir() -> Path:
    """The folder holding <model-id>.yaml files and recipes/."""
    env = os.environ.get("MOA_LOCAL_MODEL_CONFIGS")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "model_configs"


def moa_home() -> Path:
    """$MOA_LOCAL_HOME (default ~/.cache/moa-local): converted models and caches."""
    return Path(os.environ.get("MOA_LOCAL_HOME") or Path.home() / ".cache" / "moa-local")


def _loc_part(part: object) -> str:
    """One step of an error's location, quoted when it is not a plain name (a YAML key may hold anything)."""
    text = str(part)
    return text if text.isprintable() and text.strip() == text and len(text) <= 100 else repr(text[:100])


def format_validation_error(err: ValidationError) -> str:
    """A pydantic error as one line: ``loc: message; loc: message``."""
    parts = []
    for e in err.errors():
        loc = ".".join(_loc_part(p) for p in e["loc"]) or "(top level)"
        msg = " ".join(e["msg"].split())
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        parts.append(f"{loc}: {msg}")
    return "; ".join(parts)


def _read_yaml(path: Path, error: type[Exception]) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise error(f"{path} is not valid YAML: {exc}") from exc
    except RecursionError:
        raise error(f"{path} nests too deeply to be a recipe or model config") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise error(f"{path} must hold a YAML mapping at the top level, got {type(data).__name__}")
    return data


def list_model_ids() -> list[str]:
    return sorted(p.stem for p in model_configs_dir().glob("*.yaml"))


@lru_cache(maxsize=256)
def _load_model_config_cached(path: str) -> ModelConfig:
    p = Path(path)
    data = _read_yaml(p, ModelConfigError)
    try:
        cfg = ModelConfig.model_validate(data)
    except ValidationError as exc:
        raise ModelConfigError(f"model config {p}: {format_validation_error(exc)}") from exc
    if cfg.id != p.stem:
        raise ModelConfigError(f"model config {p}: id '{cfg.id}' must equal the file name '{p.stem}'")
    return cfg


def load_model_config(model_id: str) -> ModelConfig:
    """The config of ``model_id``: <model configs>/<model_id>.yaml. An id is never a path, so nothing outside that
    folder is ever read."""
    if not re.fullmatch(MODEL_ID_PATTERN, model_id):
        known = ", ".join(list_model_ids()) or "(none)"
        raise ModelConfigError(f"{model_id[:100]!r} is not a model id (lowercase letters, digits, '.', '_' and '-'; "
                               f"never a path). Known models: {known}")
    path = model_configs_dir() / f"{model_id}.yaml"
    if not path.is_file():
        known = ", ".join(list_model_ids()) or "(none)"
        raise ModelConfigError(f"unknown model '{model_id}': no {path}. Known models: {known}")
    return _load_model_config_cached(str(path))


def list_recipe_names() -> list[str]:
    return sorted(p.stem for p in (model_configs_dir() / "recipes").glob("*.yaml"))


def load_recipe(name_or_path: str | os.PathLike[str]) -> Recipe:
    """A built-in recipe by name, or a user recipe by YAML path. Checks every model id has a config."""
    text = str(name_or_path)
    path = Path(text)
    if not (text.endswith((".yaml", ".yml")) or path.is_file()):
        path = model_configs_dir() / "recipes" / f"{text}.yaml"
        if not path.is_file():
            known = ", ".join(list_recipe_names())
            raise RecipeError(f"unknown recipe '{text}'. Built-in recipes: {known}; or pass a path to a YAML file")
    elif not path.is_file():
        raise RecipeError(f"recipe file {path} does not exist")
    data = _read_yaml(path, RecipeError)
    data.setdefault("name", path.stem)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(f"recipe {path}: {format_validation_error(exc)}") from exc
    for model_id in recipe.model_ids():
        try:
            load_model_config(model_id)
        except ModelConfigError as exc:
            raise RecipeError(f"recipe {path}: {exc}") from exc
    return recipe
