"""Chat messages as users send them (the API, batch input lines, the server's bodies), checked in one place before
anything runs. Knows nothing about engines, recipes or the pipeline."""

from __future__ import annotations

from typing import Any

from moa_local.errors import InputError
from moa_local.prompts import Message

ROLES = ("system", "user", "assistant")

__all__ = ["ROLES", "check_text", "validate_messages"]


def check_text(value: Any, where: str) -> None:
    """Every string in ``value`` (a JSON value) must be valid Unicode text: no lone surrogates such as "\\ud800",
    which JSON allows as escapes but no file, tokenizer or HTTP response can carry. Raises InputError."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise InputError(f"{where}: holds a lone surrogate (an invalid \\ud800-\\udfff escape); fix the "
                                 "text") from None
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def validate_messages(messages: Any, *, where: str = "messages") -> list[Message]:
    """Check a chat ``messages`` list: dicts with role in system/user/assistant and string content, ending with a
    user turn. Raises InputError naming the bad element."""
    if not isinstance(messages, list) or not messages:
        raise InputError(f"{where} must be a non-empty list of {{role, content}} objects")
    out: list[Message] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or set(m) - {"role", "content", "name"} or "role" not in m or "content" not in m:
            raise InputError(f"{where}[{i}] must be an object with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise InputError(f"{where}[{i}].role is '{m['role']}'; expected one of {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise InputError(f"{where}[{i}].content must be a string")
        out.append({"role": m["role"], "content": m["content"]})
    if out[-1]["role"] != "user":
        raise InputError(f"{where} must end with a user message, got '{out[-1]['role']}'")
    return out
