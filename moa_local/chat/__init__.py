"""The terminal chat (`moa-local chat`): a REPL over a loaded recipe. See repl.py."""

from moa_local.chat.repl import ChatSession, ask, run_repl

__all__ = ["ChatSession", "ask", "run_repl"]
