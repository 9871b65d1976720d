"""JSONL in and out for batch jobs.

Input lines: {"id", "prompt"} | {"id", "messages"} | {"id", "instruction"} (AlpacaEval style). The whole file is
validated before any model loads; a bad line raises InputError with its line number.
Output: one JSON object per finished conversation, appended and flushed (and fsynced) as soon as it is done. A job
killed at any moment leaves at most one torn last line, which the next run cuts off before appending.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from moa_local.api import validate_messages
from moa_local.errors import InputError
from moa_local.prompts import Message


@dataclass(frozen=True)
class InputRecord:
    id: str
    messages: list[Message]
    line: int


def parse_line(obj: Any, *, line: int) -> InputRecord:
    where = f"line {line}"
    if not isinstance(obj, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    keys = [k for k in ("prompt", "messages", "instruction") if k in obj]
    if len(keys) != 1:
        raise InputError(f"{where}: needs exactly one of 'prompt', 'messages' or 'instruction' (found {keys or 'none'})")
    raw_id = obj.get("id", line)
    if not isinstance(raw_id, (str, int)) or isinstance(raw_id, bool):
        raise InputError(f"{where}: 'id' must be a string or an integer")
    key = keys[0]
    if key == "messages":
        messages = validate_messages(obj["messages"], where=f"{where}: messages")
    else:
        text = obj[key]
        if not isinstance(text, str) or not text.strip():
            raise InputError(f"{where}: '{key}' must be a non-empty string")
        messages = [{"role": "user", "content": text}]
    return InputRecord(id=str(raw_id), messages=messages, line=line)


def read_input(path: Path) -> list[InputRecord]:
    """Read and validate every line. Blank lines are skipped; duplicate ids are an error."""
    if not path.is_file():
        raise InputError(f"input file {path} does not exist")
    records: list[InputRecord] = []
    seen: dict[str, int] = {}
    with path.open(encoding="utf-8") as fh:
        for number, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise InputError(f"{path}: line {number}: not valid JSON ({exc.msg})") from None
            try:
                record = parse_line(obj, line=number)
            except InputError as exc:
                raise InputError(f"{path}: {exc}") from None
            if record.id in seen:
                raise InputError(f"{path}: line {number}: duplicate id '{record.id}' (first on line {seen[record.id]})")
            seen[record.id] = number
            records.append(record)
    if not records:
        raise InputError(f"input file {path} holds no records")
    return records


def repair_tail(path: Path) -> None:
    """Cut a torn last line (a record half-written when the job was killed)."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with path.open("rb+") as fh:
        data = fh.read()
        end = data.rfind(b"\n") + 1
        if end != len(data):
            fh.truncate(end)


def finished_ids(path: Path) -> set[str]:
    """Ids already in an output file (after cutting a torn tail). Unparseable lines are an error, not skipped."""
    if not path.is_file():
        return set()
    repair_tail(path)
    ids: set[str] = set()
    with path.open(encoding="utf-8") as fh:
        for number, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                ids.add(str(json.loads(raw)["id"]))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise InputError(f"output file {path}: line {number} is not a result record; move the file away") from None
    return ids


class ResultWriter:
    """Appends one JSON line per record, flushed and fsynced before ``write`` returns."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        repair_tail(path)
        self._fh: IO[str] = path.open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._fh.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> ResultWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
