"""What a MoA run produced: per layer, per proposer, the text or error with tokens and seconds; the aggregator's
likewise. Plain dataclasses with a JSON form (the `--trace` file). Knows nothing about engines."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from moa_local.engines.base import Usage


@dataclass(frozen=True)
class Trimmed:
    """How a request's references were cut to fit its engine's context (the rule: pipeline/trim.py)."""

    references_chars_before: int
    references_chars_after: int
    attempts: int
    """Trimmed tries sent (each after a too_long failure)."""

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass
class Response:
    """One role's answer in one layer (or the aggregator's)."""

    role: str
    model: str
    text: str | None
    error: str | None = None
    usage: Usage = field(default_factory=Usage)
    seconds: float = 0.0
    attempts: int = 1
    kind: str | None = None
    """Why it failed (an engines.base.ErrorKind), None when it did not."""
    trimmed: Trimmed | None = None
    """How its references were trimmed to fit, None when they went whole."""

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        out = {
            "role": self.role,
            "model": self.model,
            "text": self.text,
            "error": self.error,
            "usage": self.usage.to_dict(),
            "seconds": round(self.seconds, 4),
            "attempts": self.attempts,
        }
        if self.kind is not None:
            out["kind"] = self.kind
        if self.trimmed is not None:
            out["trimmed"] = self.trimmed.to_dict()
        return out


@dataclass
class LayerTrace:
    index: int
    responses: list[Response] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "responses": [r.to_dict() for r in self.responses]}


@dataclass
class Result:
    """The outcome of one conversation: the final answer (or the error that stopped it) and its trace."""

    id: str
    output: str | None
    error: str | None = None
    layers: list[LayerTrace] = field(default_factory=list)
    aggregator: Response | None = None
    seconds: float = 0.0
    kind: str | None = None
    """Why it failed: the failing request's error kind (too_long, engine_down, ...), "too_few" when too few
    proposers answered a layer, "aborted" when it was cancelled; None when it did not fail."""

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def usage(self) -> Usage:
        total = Usage()
        for layer in self.layers:
            for r in layer.responses:
                total = total + r.usage
        if self.aggregator:
            total = total + self.aggregator.usage
        return total

    def trace(self) -> dict[str, Any]:
        return {
            "output": self.output,
            "error": self.error,
            "layers": [layer.to_dict() for layer in self.layers],
            "aggregator": self.aggregator.to_dict() if self.aggregator else None,
        }
