"""JSONL in and out for batch jobs, read and written as a stream.

Input lines: {"id", "prompt"} | {"id", "messages"} | {"id", "instruction"} (AlpacaEval style). ``validate_input``
reads the whole file once before any model loads, keeping only an on-disk index of ids: a bad line (not UTF-8, not
JSON, nested too deep, a lone surrogate, a bad shape, a duplicate id) raises InputError with its line number, so a
job with a bad line writes nothing at all. ``iter_input`` then reads it again lazily while the job runs (and checks
each line again: a file changed under a running job stops it at the changed line, after everything before it).

Output: one JSON object per finished conversation, appended and flushed as soon as it is done, fsynced in groups
(``sync`` after each burst). An output file that exists must be a results file of this tool: every complete line a
result record, and a torn last line (a job killed mid-write) the start of one; only then is the torn line cut.
Anything else is refused before it is touched. Knows nothing about engines or the pipeline.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from moa_local.batch.index import IdIndex
from moa_local.errors import InputError
from moa_local.messages import check_text, validate_messages
from moa_local.prompts import Message

MAX_LINE_BYTES = 16 * 1024**2
"""Longest input line accepted (a conversation of 16 MiB is far past any model's context)."""

RECORD_START = b'{"id": '
"""How every result record begins (``json.dumps`` of a dict whose first key is "id")."""


@dataclass(frozen=True)
class InputRecord:
    id: str
    messages: list[Message]
    line: int


def parse_line(obj: Any, *, line: int) -> InputRecord:
    where = f"line {line}"
    if not isinstance(obj, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    check_text(obj, where)
    keys = [k for k in ("prompt", "messages", "instruction") if k in obj]
    if len(keys) != 1:
        raise InputError(f"{where}: needs exactly one of 'prompt', 'messages' or 'instruction' (found {keys or 'none'})")
    raw_id = obj.get("id", line)
    if not isinstance(raw_id, (str, int)) or isinstance(raw_id, bool):
        raise InputError(f"{where}: 'id' must be a string or an integer")
    if isinstance(raw_id, str) and not raw_id.strip():
        raise InputError(f"{where}: 'id' is empty")
    key = keys[0]
    if key == "messages":
        messages = validate_messages(obj["messages"], where=f"{where}: messages")
    else:
        text = obj[key]
        if not isinstance(text, str) or not text.strip():
            raise InputError(f"{where}: '{key}' must be a non-empty string")
        messages = [{"role": "user", "content": text}]
    return InputRecord(id=str(raw_id), messages=messages, line=line)


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of the non-blank lines; InputError for a line that is not UTF-8 or too long."""
    if not path.is_file():
        raise InputError(f"input file {path} does not exist (or is not a regular file)")
    try:
        fh = path.open("rb")
    except OSError as exc:
        raise InputError(f"cannot read input file {path}: {exc.strerror}") from None
    with fh:
        number = 0
        while True:
            raw = fh.readline(MAX_LINE_BYTES + 1)
            if not raw:
                return
            number += 1
            if len(raw) > MAX_LINE_BYTES:
                raise InputError(f"{path}: line {number} is longer than {MAX_LINE_BYTES // 1024**2} MiB")
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise InputError(f"{path}: line {number} is not UTF-8 text (binary or UTF-16?); save it as UTF-8 JSONL") from None
            if number == 1:
                text = text.removeprefix("\ufeff")
            if text.strip():
                yield number, text


def _parse(path: Path, number: int, text: str) -> InputRecord:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: line {number}: not valid JSON ({exc.msg})") from None
    except RecursionError:
        raise InputError(f"{path}: line {number}: JSON nested too deeply") from None
    try:
        return parse_line(obj, line=number)
    except InputError as exc:
        raise InputError(f"{path}: {exc}") from None
    except RecursionError:
        raise InputError(f"{path}: line {number}: JSON nested too deeply") from None


def iter_input(path: Path) -> Iterator[InputRecord]:
    """Every record, read lazily (validated line by line, duplicates not checked: ``validate_input`` does)."""
    for number, text in _lines(path):
        yield _parse(path, number, text)


def validate_input(path: Path) -> int:
    """Read and check every line (duplicate ids included) without keeping the records; returns their count."""
    count = 0
    with IdIndex() as ids:
        for record in iter_input(path):
            first = ids.add(record.id, record.line)
            if first is not None:
                raise InputError(f"{path}: line {record.line}: duplicate id '{record.id}' (first on line {first})")
            count += 1
    if count == 0:
        raise InputError(f"input file {path} holds no records")
    return count


def read_input(path: Path) -> list[InputRecord]:
    """Every record of a (small) input file, validated, as a list."""
    validate_input(path)
    return list(iter_input(path))


# -- output -------------------------------------------------------------------------------------------------------


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_writable(path: Path, *, what: str, avoid: Path | None = None) -> None:
    """Before anything loads: ``path`` can be appended to (its folder is made when missing). Refuses a folder, a
    device or other non-regular file, the input file itself, and anything this process may not write."""
    if avoid is not None and (_same_file(path, avoid) or path.resolve() == avoid.resolve()):
        raise InputError(f"{what} {path} is the input file; write the results to another file")
    if path.exists() or path.is_symlink():
        try:
            mode = path.stat().st_mode
        except OSError as exc:
            raise InputError(f"{what} {path}: {exc.strerror}") from None
        if stat.S_ISDIR(mode):
            raise InputError(f"{what} {path} is a folder; give a file path such as {path / 'out.jsonl'}")
        if not stat.S_ISREG(mode):
            raise InputError(f"{what} {path} is not a regular file (a device or a pipe); give a file path")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{what} {path}: cannot create its folder {path.parent} ({exc.strerror})") from None
    existed = path.exists()
    try:
        with path.open("ab"):
            pass
    except OSError as exc:
        raise InputError(f"{what} {path} is not writable ({exc.strerror})") from None
    if not existed:
        with contextlib.suppress(OSError):
            path.unlink()


def scan_output(path: Path, index: IdIndex) -> int:
    """Put the ids of an existing results file into ``index``; returns how many. The file must be a results file of
    this tool (else InputError, and it is left untouched); a torn last line is cut after the check."""
    if not path.is_file():
        return 0
    bad = (f"{path} is not a results file of moa-local (line {{n}} is not a result record); it was left untouched. "
           "Use another --output path")
    torn_at = None
    count = 0
    with path.open("rb") as fh:
        offset, number = 0, 0
        while True:
            raw = fh.readline()
            if not raw:
                break
            number += 1
            if not raw.endswith(b"\n"):
                if not raw.startswith(RECORD_START):
                    raise InputError(bad.format(n=number))
                torn_at = offset
                break
            offset += len(raw)
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
            except (ValueError, RecursionError):
                row = None
            if not isinstance(row, dict) or "id" not in row or "output" not in row:
                raise InputError(bad.format(n=number))
            index.add(str(row["id"]), number)
            count += 1
    if torn_at is not None:
        with path.open("rb+") as fh:
            fh.truncate(torn_at)
    return count


def repair_tail(path: Path) -> None:
    """Cut a torn last line (a record half-written when the job was killed); a file whose tail is not the start of
    a JSON object is left alone."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with path.open("rb+") as fh:
        data = fh.read()
        end = data.rfind(b"\n") + 1
        if end != len(data) and data[end:].lstrip().startswith(b"{"):
            fh.truncate(end)


def finished_ids(path: Path) -> set[str]:
    """Ids already in a (small) results file, after cutting a torn tail."""
    with IdIndex() as index:
        scan_output(path, index)
        return set(index.keys())


def dump_record(record: dict[str, Any]) -> str:
    """One JSON line; text that cannot be UTF-8 (a lone surrogate in a model's answer) is written escaped."""
    line = json.dumps(record, ensure_ascii=False)
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        line = json.dumps(record, ensure_ascii=True)
    return line + "\n"


class ResultWriter:
    """Appends one JSON line per record. ``group=False``: flushed and fsynced before ``write`` returns;
    ``group=True``: flushed at once, fsynced by ``sync()`` (the batch job calls it after each burst of results)."""

    def __init__(self, path: Path, *, group: bool = False) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        repair_tail(path)
        self._fh: IO[str] = path.open("a", encoding="utf-8")
        self._group = group
        self._dirty = False

    def write(self, record: dict[str, Any]) -> None:
        self._fh.write(dump_record(record))
        self._fh.flush()
        if self._group:
            self._dirty = True
        else:
            os.fsync(self._fh.fileno())

    def sync(self) -> None:
        if self._dirty:
            os.fsync(self._fh.fileno())
            self._dirty = False

    def close(self) -> None:
        if not self._fh.closed:
            self.sync()
            self._fh.close()

    def __enter__(self) -> ResultWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
