"""Engine backends behind one interface, created by name. Heavy backends are imported only when created."""

from __future__ import annotations

import importlib.util
import sys

from moa_local.config.model import ModelConfig
from moa_local.config.recipe import EngineOptions
from moa_local.engines.base import Engine, Generation, MemoryReport, Request, Usage
from moa_local.errors import InputError, MissingDependencyError

__all__ = ["Engine", "Generation", "MemoryReport", "Request", "Usage", "create_engine", "resolve_backend"]

BACKENDS = ("fake", "transformers", "vllm")


def resolve_backend(requested: str, *, notify: bool = True) -> str:
    """Turn 'auto' into a concrete backend: vllm when importable, else transformers (with a one-line notice)."""
    if requested != "auto":
        if requested not in BACKENDS:
            raise InputError(f"unknown backend '{requested}'; use auto, {', '.join(BACKENDS)}")
        return requested
    if importlib.util.find_spec("vllm") is not None:
        return "vllm"
    if notify:
        print("moa-local: vllm is not installed; using the transformers backend (slower).", file=sys.stderr)
    return "transformers"


def create_engine(config: ModelConfig, *, options: EngineOptions, backend: str) -> Engine:
    """Start an engine for ``config`` on ``backend`` (fake, transformers or vllm). Blocks until it is ready."""
    if backend == "fake":
        from moa_local.engines.fake import FakeEngine

        return FakeEngine(config.id, options=options.fake)
    if backend == "transformers":
        if importlib.util.find_spec("transformers") is None or importlib.util.find_spec("torch") is None:
            raise MissingDependencyError("transformers", extra="local", purpose="The transformers backend")
        from moa_local.engines.transformers import TransformersEngine

        return TransformersEngine(config, options=options)
    if backend == "vllm":
        if importlib.util.find_spec("vllm") is None:
            raise MissingDependencyError("vllm", extra="gpu", purpose="The vllm backend")
        from moa_local.engines.vllm import VLLMEngine  # type: ignore[import-not-found,unused-ignore]

        return VLLMEngine(config, options=options)
    raise ValueError(f"unknown backend '{backend}'; expected one of {', '.join(BACKENDS)}")
