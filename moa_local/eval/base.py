"""The suite interface: what an evaluation suite gives the eval runner, and what the runner gives back.

A suite owns its data (read from an installed package, never vendored, never fetched), the user messages it sends a
system, the judge prompts it needs (if any) and how one item is scored. It never runs a model: the runner turns its
messages into generations and hands the texts back. Nothing here imports an engine or a heavy package.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from moa_local.errors import MissingDependencyError
from moa_local.prompts import Message


@dataclass(frozen=True)
class Item:
    """One evaluation item: its id, the user turn(s) to send, and whatever the suite needs to score it."""

    id: str
    turns: list[str]
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class Score:
    """The score of one item for one system. ``value`` is None when it could not be scored (e.g. the judge's verdict
    was unparseable); ``details`` holds the suite's sub-metrics and diagnostics."""

    value: float | None
    details: dict[str, Any] = field(default_factory=dict)


class Suite(Protocol):
    """An evaluation suite. ``metric`` names what ``Score.value`` means; ``scale`` is its (low, high) range;
    ``judge_max_tokens`` is the judge's answer budget (suites scored by a judge). A suite scored by rule may also
    offer ``score_many(pairs)`` to score a batch at once."""

    name: str
    metric: str
    scale: tuple[float, float]
    needs_judge: bool
    judge_max_tokens: int

    def items(self, limit: int | None = None) -> list[Item]:
        """The items, in a fixed order; ``limit`` keeps the first N."""
        ...

    def messages(self, item: Item, turn: int, history: Sequence[str]) -> list[Message]:
        """The conversation a system answers at ``turn`` (0-based); ``history`` holds its own earlier answers."""
        ...

    def judge_prompts(self, item: Item, answers: Sequence[str | None], *, reference: str | None) -> list[list[Message]]:
        """Messages for the judge (empty for suites scored by rule). ``reference`` is a baseline answer
        (pairwise suites)."""
        ...

    def score(self, item: Item, answers: Sequence[str | None], judgments: Sequence[str | None]) -> Score:
        """Score one item from the system's answers (None: the generation failed) and the judge's texts."""
        ...

    def summary(self, records: Sequence[dict[str, Any]]) -> dict[str, float]:
        """Extra suite-level metrics for one system's records (e.g. IFEval's four accuracies); may be empty."""
        ...


def require(module: str, *, package: str, purpose: str) -> None:
    """Raise MissingDependencyError (naming the `eval` extra) unless ``module`` is importable."""
    if importlib.util.find_spec(module) is None:
        raise MissingDependencyError(package, extra="eval", purpose=purpose)


def package_file(module: str, relative: str, *, package: str, purpose: str) -> Path:
    """A data file inside an installed package (the data is never copied into this repository)."""
    require(module, package=package, purpose=purpose)
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.submodule_search_locations is not None
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise MissingDependencyError(package, extra="eval", purpose=f"{purpose} (its data file {relative} is missing)")
    return path


SuiteFactory = Callable[[], Suite]


SUITES: dict[str, str] = {
    "ifeval": "moa_local.eval.ifeval:IFEval",
    "humaneval": "moa_local.eval.humaneval:HumanEval",
    "mtbench": "moa_local.eval.mtbench:MTBench",
    "alpacaeval": "moa_local.eval.alpacaeval:AlpacaEval",
    "math": "moa_local.eval.math:MathSuite",
}
"""Suite name -> "module:class". A suite module is imported only when its suite is asked for."""


def suite_names() -> list[str]:
    return list(SUITES)


def get_suite(name: str, **options: Any) -> Suite:
    """A suite by name. Imports only that suite's module. Options go to the suite's constructor."""
    where = SUITES.get(name)
    if where is None:
        from moa_local.errors import InputError

        raise InputError(f"unknown suite '{name}'; expected one of {', '.join(suite_names())}")
    module, _, cls = where.partition(":")
    suite: Suite = getattr(importlib.import_module(module), cls)(**options)
    return suite
