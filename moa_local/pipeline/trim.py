"""Run-time reference trimming: the rule that makes a layer-2+ proposer's or the aggregator's request fit its
engine's context instead of failing it.

When a request that carries references fails with kind too_long and the failure's numbers (engines.base.Overflow),
the schedules ask its ReferenceTrim for the references of the next try:

1. characters to cut = ceil((excess + TRIM_MARGIN_TOKENS) x characters per token), where excess = prompt tokens +
   max_tokens - max_model_len and characters per token = the failed request's message characters / its prompt
   tokens (the request's own ratio);
2. water-filling over the *original* references: the largest common cap (in characters) such that cutting every
   reference longer than it to its first ``cap`` characters + TRIM_MARKER removes at least everything cut so far
   plus step 1's amount. References shorter than the cap stay whole, so the longest are cut first, down to a
   common length, and a cut reference keeps its head;
3. at most MAX_TRIMS tries, each sized from the new failure's numbers.

It gives up, and the too_long failure is recorded as it came with the reason appended, when even every reference
cut to its marker would not free enough (the conversation itself is too long for the engine) or after MAX_TRIMS
tries. A request without references or a failure without numbers is left as it is. These tries are not retries:
``policy.retries`` counts only those of failures a retry may fix. Knows engines only by the failure's numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from moa_local.engines.base import Generation
from moa_local.pipeline.trace import Trimmed
from moa_local.prompts import Message

TRIM_MARKER = " [... trimmed]"
"""Ends every cut reference."""

TRIM_MARGIN_TOKENS = 32
"""Tokens cut beyond the excess, for the ratio's error (the references' characters per token differ a little from
the whole prompt's)."""

MAX_TRIMS = 3
"""Trimmed tries of one request at most."""


def prompt_chars(messages: list[Message]) -> int:
    """The characters of a request's messages (what its prompt tokens mostly encode)."""
    return sum(len(m["content"]) for m in messages)


def water_fill(references: list[str], remove: int) -> list[str] | None:
    """``references`` with at least ``remove`` characters cut by step 2 of the rule (module doc), or None when
    cutting every reference to its marker frees less."""
    if remove <= 0:
        return list(references)

    def freed(cap: int) -> int:
        return sum(max(0, len(r) - cap - len(TRIM_MARKER)) for r in references)

    if freed(0) < remove:
        return None
    low, high = 0, max(len(r) for r in references)  # freed(low) >= remove > freed(high) == 0
    while high - low > 1:
        middle = (low + high) // 2
        if freed(middle) >= remove:
            low = middle
        else:
            high = middle
    return [r[:low].rstrip() + TRIM_MARKER if len(r) > low + len(TRIM_MARKER) else r for r in references]


@dataclass
class ReferenceTrim:
    """The references one request carries, trimmed by the rule as its too_long failures come back."""

    original: list[str]
    references: list[str] = field(default_factory=list)
    """What the next try sends."""
    sent_chars: int = 0
    """The message characters of the request last sent (what its prompt tokens mostly encode)."""
    tries: int = 0
    gave_up: str | None = None
    """Why trimming stopped without a fit (None while it has not)."""

    def __post_init__(self) -> None:
        self.references = list(self.original)

    def sent(self, messages: list[Message]) -> None:
        """Note the messages of the request just sent with ``references`` (one request in flight per trim)."""
        self.sent_chars = prompt_chars(messages)

    def retry(self, gen: Generation) -> bool:
        """After ``gen`` came back for the request last ``sent``: True when the references were cut further and the
        request should go again; False when ``gen`` stands (``gave_up`` says why when trimming could not help)."""
        overflow = gen.overflow
        if gen.kind != "too_long" or overflow is None or not self.original or overflow.prompt_tokens <= 0:
            return False
        if self.tries >= MAX_TRIMS:
            self.gave_up = f"still too long after {MAX_TRIMS} trims of the references"
            return False
        per_token = self.sent_chars / overflow.prompt_tokens
        cut = math.ceil((max(1, overflow.excess) + TRIM_MARGIN_TOKENS) * per_token)
        trimmed = water_fill(self.original, self._chars(self.original) - self._chars(self.references) + cut)
        if trimmed is None:
            self.gave_up = ("even with every reference cut to its marker it would not fit: the conversation itself "
                            "is too long for this engine")
            return False
        self.references, self.tries = trimmed, self.tries + 1
        return True

    def explain(self, gen: Generation) -> Generation:
        """``gen`` with why trimming gave up appended to its error (unchanged when it did not)."""
        if self.gave_up is None or gen.error is None:
            return gen
        return replace(gen, error=f"{gen.error}; {self.gave_up}")

    def record(self) -> Trimmed | None:
        """What the trace records: None when the references went whole."""
        if not self.tries:
            return None
        return Trimmed(references_chars_before=self._chars(self.original),
                       references_chars_after=self._chars(self.references), attempts=self.tries)

    @staticmethod
    def _chars(references: list[str]) -> int:
        return sum(len(r) for r in references)
