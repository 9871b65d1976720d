"""The terminal chat: a multi-turn conversation with a loaded recipe, its final answer streamed as it is written.

    you> Why is the sky blue?
    [layer 1/2: 2/2 proposers done]          (one status line on stderr while the proposers work)
    Sunlight is scattered by ...              (the aggregator's answer, streamed to stdout)

Commands: /reset (forget the conversation), /trace (the last turn's proposer answers), /help, /exit (or EOF).
Owns: the history (the conversation's messages list), the REPL loop and its output. Never touches engines: it calls
the pipeline's ``stream`` through the loaded MoA; chunked recipes stream the same way.
"""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass, field
from typing import TextIO

from moa_local.api import MoA
from moa_local.errors import MoaError
from moa_local.pipeline import Conversation, Listener, RoleEvent
from moa_local.pipeline.trace import LayerTrace
from moa_local.prompts import Message

HELP = "commands: /reset (new conversation), /trace (last turn's proposer answers), /help, /exit"


@dataclass
class ChatSession:
    """The conversation so far and what the last turn's proposers said. Pure state: no IO."""

    system: str | None = None
    messages: list[Message] = field(default_factory=list)
    last_layers: list[LayerTrace] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.last_layers = []

    @property
    def turns(self) -> int:
        return sum(m["role"] == "user" for m in self.messages)

    def trace_text(self) -> str:
        if not self.last_layers:
            return "no turn yet"
        lines = []
        for layer in self.last_layers:
            lines.append(f"layer {layer.index}:")
            for r in layer.responses:
                head = f"  {r.role} ({r.model}, {r.usage.completion_tokens} tokens, {r.seconds:.2f} s"
                head += f", {r.attempts} attempts)" if r.attempts > 1 else ")"
                body = r.text.strip() if r.ok and r.text is not None else f"FAILED: {r.error}"
                lines.append(f"{head}\n    " + body.replace("\n", "\n    "))
        return "\n".join(lines)


class StatusLine:
    """One progress line on a terminal (rewritten in place), or one line per change elsewhere."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.tty = bool(getattr(out, "isatty", lambda: False)())
        self.shown = ""
        self.muted = False  # while the answer streams, the line stays quiet
        self._lock = threading.Lock()

    def show(self, text: str) -> None:
        with self._lock:
            if self.muted or text == self.shown:
                return
            self.shown = text
            self.out.write(f"\r\x1b[2K[{text}]" if self.tty else f"[{text}]\n")
            self.out.flush()

    def clear(self) -> None:
        with self._lock:
            if self.tty and self.shown:
                self.out.write("\r\x1b[2K")
                self.out.flush()
            self.shown = ""

    def listener(self, layers: int, proposers: int) -> Listener:
        """A scheduler listener that shows how many proposers of each layer are done."""
        done: dict[int, int] = {}

        def on_event(event: RoleEvent) -> None:
            if event.kind != "done" or event.aggregator:
                return
            done[event.layer] = done.get(event.layer, 0) + 1
            self.show(f"layer {event.layer}/{layers}: {done[event.layer]}/{proposers} proposers done")

        return on_event


def run_repl(moa: MoA, *, stdin: TextIO | None = None, stdout: TextIO | None = None, stderr: TextIO | None = None,
             system: str | None = None) -> int:
    """Read turns from ``stdin`` until /exit or EOF; stream each answer to ``stdout``. Returns the exit code."""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    session = ChatSession(system=system)
    status = StatusLine(stderr)
    interactive = bool(getattr(stdin, "isatty", lambda: False)())
    mode = f"{moa.recipe.aggregation} aggregation" + (f", {moa.recipe.chunk_tokens}-token chunks" if moa.recipe.aggregation == "chunked" else "")
    stderr.write(f"moa-local chat: recipe '{moa.recipe.name}' ({moa.backend}, {mode}). {HELP}\n")
    while True:
        if interactive:
            stdout.write("you> ")
            stdout.flush()
        line = stdin.readline()
        if not line:
            break
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            command = text.split()[0].lower()
            if command in ("/exit", "/quit"):
                break
            if command == "/reset":
                session.reset()
                stderr.write("conversation cleared\n")
            elif command == "/trace":
                stdout.write(session.trace_text() + "\n")
            elif command == "/help":
                stderr.write(HELP + "\n")
            else:
                stderr.write(f"unknown command {command}; {HELP}\n")
            stdout.flush()
            continue
        ask(moa, session, text, stdout=stdout, status=status)
    return 0


def ask(moa: MoA, session: ChatSession, text: str, *, stdout: TextIO, status: StatusLine) -> str | None:
    """One turn: stream the answer to ``stdout`` and keep it in the history. On failure the turn is dropped (the
    user can ask again) and the error printed; Ctrl-C stops the answer and drops the turn too."""
    messages = [*session.messages, {"role": "user", "content": text}]
    conversation = Conversation(id=f"turn-{session.turns + 1}", messages=messages)
    answer = ""
    deltas = None
    status.muted = False
    try:
        run = moa.pipeline.stream(conversation, listener=status.listener(moa.recipe.layers,
                                                                         len(moa.recipe.proposer_roles())))
        deltas = iter(run)
        for delta in deltas:
            if not answer:
                status.clear()
                status.muted = True
            answer += delta
            stdout.write(delta)
            stdout.flush()
        session.last_layers = run.result().layers
    except MoaError as exc:
        status.clear()
        if answer:
            stdout.write("\n")
        status.out.write(f"error: {exc}\n")
        status.out.flush()
        return None
    except KeyboardInterrupt:
        status.clear()
        stdout.write("\n")
        status.out.write("(answer stopped; the turn was dropped)\n")
        return None
    finally:
        close = getattr(deltas, "close", None)
        if close is not None:
            close()
    status.clear()
    stdout.write("\n")
    stdout.flush()
    session.messages = [*messages, {"role": "assistant", "content": answer.strip()}]
    return answer
