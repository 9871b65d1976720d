"""Simulated weights folders: what a Hugging Face model folder holds, minus the weights.

Owns ``make_weights(config, dest)``: ``config.json`` (the architecture in Hugging Face's keys, a
``quantization_config`` for a pre-quantized AWQ/FP8 checkpoint), a byte-level tokenizer (every text encodes, one
token per byte) with the model family's special tokens, the published chat template vendored under
model_configs/chat_templates/ (prompt format ``chat_template`` only), ``generation_config.json`` with the end-of-turn
ids (leave it out to test a folder without one) and ``sim.json`` for the stand-in engine. Reads the model config,
never the planner.
"""

from __future__ import annotations

import json
from pathlib import Path

from moa_local.config.model import ModelConfig
from moa_local.prompts import vendored_chat_template

SPECIALS: dict[str, tuple[str | None, str, str, tuple[str, ...]]] = {
    "qwen": (None, "<|im_end|>", "<|im_end|>", ("<|endoftext|>", "<|im_start|>", "<|im_end|>")),
    "llama-3": ("<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>",
                ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
    "mixtral": ("<s>", "</s>", "</s>", ("<s>", "</s>", "[INST]", "[/INST]")),
    "wizardlm": ("<s>", "</s>", "</s>", ("<s>", "</s>")),
    "dbrx": (None, "<|endoftext|>", "<|im_end|>", ("<|endoftext|>", "<|im_start|>", "<|im_end|>")),
    "smollm2": ("<|im_start|>", "<|im_end|>", "<|im_end|>", ("<|endoftext|>", "<|im_start|>", "<|im_end|>")),
    "gemma3": ("<bos>", "<eos>", "<eos>", ("<bos>", "<eos>")),
}
"""Per model-id prefix: BOS, EOS (the tokenizer's), the end-of-turn token the model emits, special tokens, as the
published tokenizer_config.json files of these models have them."""


def _specials(model_id: str) -> tuple[str | None, str, str, tuple[str, ...]]:
    for prefix, spec in SPECIALS.items():
        if model_id.startswith(prefix):
            return spec
    return SPECIALS["mixtral"]


def make_weights(config: ModelConfig, dest: str | Path, *, quantization: str | None = None,
                 generation_config: bool = True) -> Path:
    """Write a simulated weights folder for ``config`` at ``dest``; ``quantization`` "awq"/"fp8" makes it a
    pre-quantized checkpoint of that method."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    folder = Path(dest)
    folder.mkdir(parents=True, exist_ok=True)
    bos, eos, eot, specials = _specials(config.id)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(specials))
    tok.save(str(folder / "tokenizer.json"))
    ids = {s: tok.token_to_id(s) for s in specials}
    tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "bos_token": bos,
                        "model_max_length": config.architecture.max_context, "clean_up_tokenization_spaces": False}
    template = vendored_chat_template(config.id) if config.prompt_format == "chat_template" else None
    if template is not None:
        (folder / "chat_template.jinja").write_text(template)
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=1))
    arch = config.architecture
    cfg: dict[str, object] = {
        "architectures": ["SimulatedForCausalLM"], "model_type": config.family,
        "num_hidden_layers": arch.num_layers, "hidden_size": arch.hidden_size,
        "intermediate_size": arch.intermediate_size, "num_attention_heads": arch.num_attention_heads,
        "num_key_value_heads": arch.num_kv_heads, "head_dim": arch.head_dim, "vocab_size": arch.vocab_size,
        "max_position_embeddings": arch.max_context, "tie_word_embeddings": arch.tie_word_embeddings,
        "qkv_bias": arch.attention_bias, "torch_dtype": "float16" if quantization == "awq" else "bfloat16",
        "eos_token_id": ids[eos], "bos_token_id": ids.get(bos) if bos else None,
    }
    if arch.num_experts:
        cfg["num_local_experts"], cfg["num_experts_per_tok"] = arch.num_experts, arch.experts_per_token
    if quantization == "awq":
        cfg["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True}
    elif quantization == "fp8":
        cfg["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic"}
    (folder / "config.json").write_text(json.dumps(cfg, indent=1))
    if generation_config:
        (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": sorted({ids[eos], ids[eot]})}))
    (folder / "sim.json").write_text(json.dumps({"label": config.id, "end_of_turn_id": ids[eot]}))
    return folder
