"""Pydantic configuration: model configs, recipes, sampling, engine options. Pure data, no heavy imports."""

from moa_local.config.model import Architecture, ModelConfig, WeightsSource
from moa_local.config.recipe import (
    EngineOptions,
    FailurePolicy,
    FakeOptions,
    Recipe,
    Role,
    Sampling,
)
from moa_local.config.registry import (
    list_model_ids,
    list_recipe_names,
    load_model_config,
    load_recipe,
    model_configs_dir,
)

__all__ = [
    "Architecture",
    "EngineOptions",
    "FailurePolicy",
    "FakeOptions",
    "ModelConfig",
    "Recipe",
    "Role",
    "Sampling",
    "WeightsSource",
    "list_model_ids",
    "list_recipe_names",
    "load_model_config",
    "load_recipe",
    "model_configs_dir",
]
