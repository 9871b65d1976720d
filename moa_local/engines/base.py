"""The one engine interface the pipeline sees. Backends (fake, transformers, vllm) differ behind it and nowhere else.

An engine serves one model. It takes chat messages (it renders them with its model's prompt format), generates a
whole batch at once, and reports per-request failures in the result instead of raising, so one bad prompt never
sinks a batch. It knows nothing about layers, references or recipes.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from moa_local.config.recipe import Sampling
from moa_local.prompts import Message


@dataclass(frozen=True)
class Request:
    """One generation request: a conversation and how to sample the answer."""

    messages: list[Message]
    sampling: Sampling
    request_id: str = ""


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(self.prompt_tokens + other.prompt_tokens, self.completion_tokens + other.completion_tokens)

    def to_dict(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens}


@dataclass
class Generation:
    """The answer to one Request: text, or an error message (never both)."""

    text: str | None
    usage: Usage = field(default_factory=Usage)
    seconds: float = 0.0
    error: str | None = None
    finish_reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @classmethod
    def failed(cls, error: str, *, seconds: float = 0.0) -> Generation:
        return cls(text=None, error=error, seconds=seconds)


@dataclass(frozen=True)
class MemoryReport:
    """What an engine holds, in bytes (0 where unknown)."""

    weights_bytes: int = 0
    kv_cache_bytes: int = 0
    peak_bytes: int = 0
    device: str = "cpu"


class Engine(abc.ABC):
    """A loaded model. Subclasses implement generate/stream/close; everything else is optional."""

    model_id: str

    @abc.abstractmethod
    def generate(self, requests: Sequence[Request]) -> list[Generation]:
        """Answer every request, as one batch. Same length and order as ``requests``; failures are Generations
        with ``error`` set. Raises EngineDiedError only when the engine itself is gone."""

    def stream(self, request: Request) -> Iterator[str]:
        """Yield text deltas of one answer. Default: generate, then yield the whole text."""
        (gen,) = self.generate([request])
        if gen.error:
            from moa_local.errors import EngineError

            raise EngineError(f"{self.model_id}: {gen.error}")
        yield gen.text or ""

    def memory(self) -> MemoryReport:
        return MemoryReport()

    def is_alive(self) -> bool:
        return True

    @abc.abstractmethod
    def close(self) -> None:
        """Free the model. Idempotent."""

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
