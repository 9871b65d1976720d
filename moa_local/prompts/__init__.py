"""Prompts are data: the aggregate-and-synthesize prompt and the non-chat-template formats, defined once here.

`inject_references` builds the messages a layer-k>1 proposer or the aggregator sees; `render_prompt` turns messages
into the text an engine tokenizes. Knows nothing about engines or the pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any, Protocol

Message = dict[str, str]


@cache
def prompt_text(name: str) -> str:
    """A package-data prompt file by stem (aggregate, transcript)."""
    return resources.files("moa_local.prompts").joinpath(f"{name}.txt").read_text()


def format_references(references: list[str]) -> str:
    return "\n".join(f"{i}. {text.strip()}" for i, text in enumerate(references, start=1))


def inject_references(messages: list[Message], references: list[str], *, system_prompt: str | None = None) -> list[Message]:
    """Return a copy of ``messages`` whose system message carries the references to the last user turn.

    An existing system message is kept and the aggregate prompt appended to it; otherwise one is prepended.
    With no references (layer 1) only ``system_prompt`` (the role's own) is applied.
    """
    out = [dict(m) for m in messages]
    extra = [p for p in (system_prompt, prompt_text("aggregate").format(references=format_references(references)) if references else None) if p]
    if not extra:
        return out
    addition = "\n\n".join(extra)
    if out and out[0]["role"] == "system":
        out[0]["content"] = f"{out[0]['content']}\n\n{addition}"
    else:
        out.insert(0, {"role": "system", "content": addition})
    return out


class ChatTokenizer(Protocol):
    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any: ...


@dataclass(frozen=True)
class RenderedPrompt:
    text: str
    stop: tuple[str, ...]
    add_special_tokens: bool


VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


def fold_system(messages: list[Message]) -> list[Message]:
    """The system text moved into the first user turn ("SYSTEM\n\nUSER"), for chat templates that drop or refuse a
    system role; messages without a system message or without a user turn are returned unchanged."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    rest = [dict(m) for m in messages if m["role"] != "system"]
    first_user = next((m for m in rest if m["role"] == "user"), None)
    if not system or first_user is None:
        return [dict(m) for m in messages]
    first_user["content"] = f"{system}\n\n{first_user['content']}"
    return rest


def vendored_chat_template(model_id: str) -> str | None:
    """The published chat template of ``model_id`` as vendored under model_configs/chat_templates/ (None if there is
    none); its source is in SOURCES.md there. Engines use the template of their weights folder; tests and the
    simulated GPU server use these."""
    from moa_local.config.registry import model_configs_dir

    path = model_configs_dir() / "chat_templates" / f"{model_id}.jinja"
    return path.read_text() if path.is_file() else None


def render_prompt(
    messages: list[Message],
    *,
    prompt_format: str,
    tokenizer: ChatTokenizer | None = None,
    system_prompt: str = "system_role",
) -> RenderedPrompt:
    """Render chat messages to the prompt text of one model.

    chat_template: the tokenizer's own template (its special tokens are in the text, so add_special_tokens=False).
    vicuna: WizardLM-2's "USER: ... ASSISTANT:" format. transcript: a plain transcript for base models.
    Messages ending with an assistant turn ask the model to *continue* that turn (chunk-wise aggregation).
    ``system_prompt`` (the model config's): "first_user_turn" folds the system text into the first user turn.
    """
    if system_prompt == "first_user_turn":
        messages = fold_system(messages)
    continuing = bool(messages) and messages[-1]["role"] == "assistant"
    if prompt_format == "chat_template":
        if tokenizer is None:
            raise ValueError("chat_template rendering needs the model's tokenizer")
        how = {"continue_final_message": True} if continuing else {"add_generation_prompt": True}
        text = tokenizer.apply_chat_template(messages, tokenize=False, **how)
        return RenderedPrompt(text=text, stop=(), add_special_tokens=False)
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    turns = [m for m in messages if m["role"] != "system"]
    if prompt_format == "vicuna":
        parts = [system or VICUNA_SYSTEM]
        for m in turns:
            if m["role"] == "user":
                parts.append(f"USER: {m['content']}")
            else:
                parts.append(f"ASSISTANT: {m['content']}</s>")
        if continuing:
            parts[-1] = parts[-1].removesuffix("</s>")
        else:
            parts.append("ASSISTANT:")
        return RenderedPrompt(text=" ".join(parts), stop=("USER:",), add_special_tokens=True)
    if prompt_format == "transcript":
        lines = [f"{system}\n"] if system else []
        for m in turns:
            speaker = "User" if m["role"] == "user" else "Assistant"
            lines.append(f"{speaker}: {m['content']}\n")
        if continuing:
            text = turns[-1]["content"]
            lines[-1] = "Assistant:" + (text if text[:1].isspace() else f" {text}")
        else:
            lines.append("Assistant:")
        return RenderedPrompt(text="\n".join(lines), stop=("\nUser:", "\nSystem:", "\n\n\n"), add_special_tokens=True)
    raise ValueError(f"unknown prompt_format '{prompt_format}'; expected chat_template, vicuna or transcript")
