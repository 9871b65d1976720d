"""What `moa-local view` can read, turned into one shape: a list of conversations, each with its traces.

    batch output   JSONL lines {"id", "output", "error", "usage", "seconds", "trace"?} (`run --input --output --trace`)
    trace file     one JSON object {"output", "error", "layers", "aggregator"} (`run PROMPT --trace FILE`)
    eval folder    results.jsonl rows {"system", "family", "item", "score", "answers", "trace", ...} and run.json

Read-only: a file being appended to by a running job is never modified (a torn last line is skipped and said so,
where the batch and eval writers would cut it). Knows nothing about similarity or HTML.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from moa_local.errors import InputError, MoaError
from moa_local.eval.results import RESULTS, RUN

Kind = Literal["batch", "trace", "eval"]


@dataclass
class Conversation:
    """One conversation (batch line, trace file or eval item) as the viewer shows it."""

    id: str
    prompt: str | None = None
    output: str | None = None
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float | None = None
    traces: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # (label, trace as `--trace` writes it)
    scores: dict[str, float | None] = field(default_factory=dict)  # eval: system -> score on this item
    answers: dict[str, list[str | None]] = field(default_factory=dict)  # eval: system -> its answer per turn
    outcome: int | None = None  # eval: +1 MoA scored above the best single system on this item, -1 below, 0 equal


@dataclass
class EvalSummary:
    """An eval folder's table: every system's score, the best single system, MoA against it."""

    suite: str
    metric: str
    percent: bool
    systems: list[dict[str, Any]]  # name, family, model, mean, low, high, n, items, failed
    best: str | None
    comparisons: list[dict[str, Any]]  # label, mean, low, high, n, p_not_better


@dataclass
class Source:
    kind: Kind
    path: str
    conversations: list[Conversation]
    notes: list[str] = field(default_factory=list)  # what the reader should know (skipped lines, missing prompts)
    eval: EvalSummary | None = None


def read_source(path: Path, *, input: Path | None = None) -> Source:
    """Read a batch output, a trace file or an eval folder (or its results.jsonl). ``input`` is the batch input the
    output came from; its prompts are shown next to the answers."""
    if path.is_dir():
        if not (path / RESULTS).is_file():
            raise InputError(f"{path} is a folder without {RESULTS}; give a batch output (.jsonl), a --trace file "
                             "(.json) or an eval folder")
        return _read_eval(path)
    if not path.is_file():
        raise InputError(f"{path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        whole = None
    if isinstance(whole, dict) and "layers" in whole:
        conv = _conversation(path.stem, whole, trace=whole)
        return Source("trace", str(path), [conv])
    rows, notes = _jsonl(text, path)
    if rows and "system" in rows[0] and "item" in rows[0]:
        return _read_eval(path.parent)
    if not rows:
        raise InputError(f"{path} holds no records")
    return _read_batch(path, rows, notes, input)


def _jsonl(text: str, path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """JSON objects, one per line. A torn last line (no newline, not JSON: a job still writing) is skipped."""
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    lines = text.split("\n")
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except json.JSONDecodeError:
            if number == len(lines):  # the file does not end with a newline: a record half-written
                notes.append(f"line {number} of {path.name} is incomplete (a job still writing?) and was skipped")
                continue
            raise InputError(f"{path}: line {number} is not valid JSON") from None
        if not isinstance(row, dict) or "id" not in row and "item" not in row:
            raise InputError(f"{path}: line {number} is not a result record (no 'id'); give a batch output, a "
                             "--trace file or an eval folder")
        rows.append(row)
    return rows, notes


def _conversation(conv_id: str, row: dict[str, Any], *, trace: dict[str, Any] | None) -> Conversation:
    usage = row.get("usage") or {}
    conv = Conversation(id=conv_id, output=row.get("output"), error=row.get("error"),
                        prompt_tokens=int(usage.get("prompt_tokens", 0)),
                        completion_tokens=int(usage.get("completion_tokens", 0)), seconds=row.get("seconds"))
    if trace is not None:
        conv.traces.append(("moa", trace))
        if not usage:  # a --trace file has no totals: add up its roles
            for r in _responses(trace):
                conv.prompt_tokens += int((r.get("usage") or {}).get("prompt_tokens", 0))
                conv.completion_tokens += int((r.get("usage") or {}).get("completion_tokens", 0))
    return conv


def _responses(trace: dict[str, Any]) -> list[dict[str, Any]]:
    out = [r for layer in trace.get("layers") or [] for r in layer.get("responses") or []]
    return out + ([trace["aggregator"]] if trace.get("aggregator") else [])


def _read_batch(path: Path, rows: list[dict[str, Any]], notes: list[str], input: Path | None) -> Source:
    prompts: dict[str, str] = {}
    if input is not None:
        from moa_local.batch.jsonl import read_input

        prompts = {r.id: render_messages(r.messages) for r in read_input(input)}
    convs = [_conversation(str(row["id"]), row, trace=row.get("trace")) for row in rows]
    for conv in convs:
        conv.prompt = prompts.get(conv.id)
    if input is None:
        notes.append("prompts are not in a batch output; give the job's input with --input to show them")
    elif missing := sum(1 for c in convs if c.prompt is None):
        notes.append(f"{missing} ids of the output are not in {input.name}")
    if not any(c.traces for c in convs):
        notes.append("no line has a trace (the job ran without --trace): answers only, no layers")
    return Source("batch", str(path), convs, notes)


def render_messages(messages: list[dict[str, str]]) -> str:
    """A conversation as text: a lone user turn as itself, longer ones as 'role: content' paragraphs."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in messages)


def _read_eval(folder: Path) -> Source:
    from moa_local.eval.report import summarize

    path = folder / RESULTS
    rows, notes = _jsonl(path.read_text(encoding="utf-8"), path)
    if not rows:
        raise InputError(f"no results in {folder} yet")
    info: dict[str, Any] = json.loads((folder / RUN).read_text(encoding="utf-8")) if (folder / RUN).is_file() else {}
    report = summarize(rows, info)
    best = report.best_single()
    summary = EvalSummary(
        suite=report.suite, metric=report.metric, percent=report.scale == (0.0, 1.0),
        systems=[{"name": r.name, "family": r.family, "model": r.model, "items": r.items, "failed": r.failed,
                  **({"mean": r.interval.mean, "low": r.interval.low, "high": r.interval.high, "n": r.interval.n}
                     if r.interval else {})} for r in report.rows],
        best=best.name if best else None,
        comparisons=[{"label": c.label, **({"mean": c.diff.mean, "low": c.diff.low, "high": c.diff.high, "n": c.diff.n,
                                           "p_not_better": c.diff.p_not_better} if c.diff else {})}
                     for c in report.comparisons],
    )
    convs: dict[str, Conversation] = {}
    order = [r.name for r in report.rows]  # moa first, then self-moa, proposers, aggregator
    for row in sorted(rows, key=lambda r: order.index(r["system"])):
        conv = convs.setdefault(str(row["item"]), Conversation(id=str(row["item"])))
        system = row["system"]
        conv.scores[system] = row.get("score")
        conv.answers[system] = list(row.get("answers") or [])
        turns = [t for t in row.get("trace") or [] if t]
        for turn, trace in enumerate(turns, start=1):
            conv.traces.append((system + (f" · turn {turn}" if len(turns) > 1 else ""), trace))
        if row.get("family") == "moa":
            usage = row.get("usage") or {}
            conv.prompt_tokens, conv.completion_tokens = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
            conv.seconds = row.get("seconds")
            conv.output = (row.get("answers") or [None])[-1]
            conv.error = next((e for e in row.get("errors") or [] if e), None)
    for conv in convs.values():
        moa, single = conv.scores.get("moa"), conv.scores.get(best.name) if best else None
        if moa is not None and single is not None:
            conv.outcome = (moa > single) - (moa < single)
    if best is None:
        notes.append("no single system was scored, so there is no MoA won/lost against the best one")
    elif report.row("moa") is None:
        notes.append("this folder has no MoA results (system 'moa'): no won/lost")
    prompts = _eval_prompts(report.suite, notes)
    for conv in convs.values():
        conv.prompt = prompts.get(conv.id)
    return Source("eval", str(folder), list(convs.values()), notes, summary)


def _eval_prompts(suite: str, notes: list[str]) -> dict[str, str]:
    """Each item's user turns, from the suite's data package; none (with a note) when it is not installed."""
    from moa_local.eval.base import get_suite

    try:
        return {item.id: "\n\n".join(item.turns) for item in get_suite(suite).items()}
    except MoaError as exc:
        notes.append(f"prompts not shown: {exc}")
        return {}
