"""Word-level similarity between answers: how much each proposer agreed with the others of its layer, and which
reference the aggregator's answer is closest to. The definition is stated on the report page (``DESCRIPTION``).

Pure text arithmetic: knows no file format, no trace shape, no HTML.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

DESCRIPTION = (
    "Similarity is word-level (ROUGE-1 F1): 2 × the words two answers share, counted with repeats, divided by the "
    "words in both; words are lower-cased runs of letters and digits, order is ignored. 1 means the same words, "
    "0 none in common. A proposer's agreement is its mean similarity to the other proposers of its layer that "
    "answered; the aggregator's answer is compared with each answer of the last layer (its references)."
)

_WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    """Lower-cased words (runs of letters, digits and underscores)."""
    return _WORD.findall(text.lower())


def similarity(a: str | None, b: str | None) -> float | None:
    """ROUGE-1 F1 of the two texts' words; None when either text is missing. Two empty texts are 1."""
    return _f1(_bag(a), _bag(b))


def agreement(texts: Sequence[str | None]) -> list[float | None]:
    """For each text, its mean similarity to the other present texts; None for a missing text or one alone."""
    bags = [_bag(t) for t in texts]
    out: list[float | None] = []
    for i, mine in enumerate(bags):
        scores = [s for j, other in enumerate(bags) if j != i and (s := _f1(mine, other)) is not None]
        out.append(sum(scores) / len(scores) if scores else None)
    return out


def closeness(answer: str | None, references: Sequence[str | None]) -> list[float | None]:
    """The answer's similarity to each reference (None where the reference, or the answer, is missing)."""
    mine = _bag(answer)
    return [_f1(mine, _bag(ref)) for ref in references]


def _bag(text: str | None) -> Counter[str] | None:
    return None if text is None else Counter(words(text))


def _f1(a: Counter[str] | None, b: Counter[str] | None) -> float | None:
    if a is None or b is None:
        return None
    total = a.total() + b.total()
    return 1.0 if total == 0 else 2 * (a & b).total() / total


def closest(scores: Sequence[float | None]) -> int | None:
    """Index of the highest score (the first on a tie), None when there is none."""
    best: int | None = None
    for i, s in enumerate(scores):
        if s is not None and (best is None or s > (scores[best] or 0.0)):
            best = i
    return best
