"""The eval output folder: results.jsonl (one line per (system, item), appended, flushed and fsynced as soon as it
is scored, so a killed run resumes where it stopped) and run.json (what was run).

Reuses the batch job's append-only writer and torn-tail repair. A results file written for another suite or recipe
is refused rather than mixed in. Knows nothing about engines or scoring.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moa_local.batch.jsonl import ResultWriter, repair_tail
from moa_local.errors import InputError

RESULTS = "results.jsonl"
RUN = "run.json"
REPORT = "report.md"
PLOT = "scores.png"


def record_id(system: str, item: str) -> str:
    return f"{system}|{item}"


def load_records(folder: Path) -> list[dict[str, Any]]:
    """Every record in ``folder``/results.jsonl (after cutting a torn last line); [] when there is none."""
    path = folder / RESULTS
    if not path.is_file():
        return []
    repair_tail(path)
    records = []
    with path.open(encoding="utf-8") as fh:
        for number, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
            except json.JSONDecodeError:
                row = None
            if not isinstance(row, dict) or "system" not in row or "item" not in row:
                raise InputError(f"{path}: line {number} is not an eval record; move the file away")
            records.append(row)
    return records


def check_compatible(records: list[dict[str, Any]], *, suite: str, recipe: str, folder: Path) -> None:
    """Refuse to resume into a folder that holds another suite's or recipe's results."""
    for row in records[:1]:
        if row.get("suite") != suite or row.get("recipe") != recipe:
            raise InputError(
                f"{folder / RESULTS} holds results of suite '{row.get('suite')}' with recipe '{row.get('recipe')}', "
                f"not '{suite}' with '{recipe}'. Use another --output folder."
            )


def write_run_info(folder: Path, info: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / RUN).write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def read_run_info(folder: Path) -> dict[str, Any]:
    path = folder / RUN
    if not path.is_file():
        return {}
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


def open_writer(folder: Path) -> ResultWriter:
    return ResultWriter(folder / RESULTS)
