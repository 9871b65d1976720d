"""The data a report embeds: a compact JSON the page's script (static/report.js) reads. Keep the two in step.

    {"v": 1, "kind": "batch" | "trace" | "eval", "path", "similarity": how it is computed, "notes": [...],
     "names": [every role and model name, interned], "roles": [per-role totals], "eval": {...} | null,
     "convs": [conv, ...]}
    conv     = {"i": id, "p": prompt, "o": output (only without a trace), "e": error, "f": 1 a role failed |
                2 the conversation failed (absent when fine), "u": [prompt tokens, completion tokens], "s": seconds,
                "t": [trace, ...], eval only: "sc": [score per system], "a": [answers per system], "w": +1/-1/0}
    trace    = [label, output (true: the aggregator's text), error, [[response, ...] per layer], aggregator | null]
    response = [role (index into names), model (index), text, error, prompt tokens, completion tokens, seconds,
                attempts, sim]; sim is a proposer's agreement with the rest of its layer, or for the aggregator a
                list: its similarity to each response of the last layer (its references).

Positional arrays keep 10,000 conversations small (no repeated keys). Absent optional keys mean null.
Pure: turns a Source into a dict; never reads files, never writes HTML.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from moa_local.view.similarity import DESCRIPTION, agreement, closeness, closest
from moa_local.view.sources import Conversation, Source

VERSION = 1


@dataclass
class _RoleTotals:
    label: str
    role: str
    model: str
    aggregator: bool
    calls: int = 0
    failed: int = 0
    retried: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    agreement: list[float] = field(default_factory=list)
    closest: int = 0  # times the aggregator's answer was closest to this role's last-layer answer

    def row(self) -> dict[str, Any]:
        return {"label": self.label, "role": self.role, "model": self.model, "agg": self.aggregator,
                "calls": self.calls, "failed": self.failed, "retried": self.retried, "pt": self.prompt_tokens,
                "ct": self.completion_tokens, "s": round(self.seconds, 2),
                "agree": round(sum(self.agreement) / len(self.agreement), 3) if self.agreement else None,
                "closest": self.closest}


class _Encoder:
    def __init__(self) -> None:
        self.names: list[str] = []
        self._index: dict[str, int] = {}
        self.totals: dict[tuple[str, str, bool], _RoleTotals] = {}

    def name(self, value: str) -> int:
        if value not in self._index:
            self._index[value] = len(self.names)
            self.names.append(value)
        return self._index[value]

    def response(self, r: dict[str, Any], sim: Any, *, label: str, aggregator: bool) -> list[Any]:
        usage = r.get("usage") or {}
        pt, ct = int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0))
        seconds = round(float(r.get("seconds") or 0.0), 3)
        attempts = int(r.get("attempts", 1))
        key = (label, r["role"], aggregator)
        t = self.totals.get(key) or self.totals.setdefault(key, _RoleTotals(label, r["role"], r["model"], aggregator))
        t.calls += 1
        t.failed += r.get("error") is not None
        t.retried += attempts > 1
        t.prompt_tokens, t.completion_tokens, t.seconds = t.prompt_tokens + pt, t.completion_tokens + ct, t.seconds + seconds
        if isinstance(sim, float):
            t.agreement.append(sim)
        out = [self.name(r["role"]), self.name(r["model"]), r.get("text"), r.get("error"), pt, ct, seconds, attempts,
               sim]
        trimmed = r.get("trimmed")
        if isinstance(trimmed, dict):  # its references were cut to fit (docs/scheduler.md, "Reference trimming")
            out.append([int(trimmed.get(k, 0)) for k in ("references_chars_before", "references_chars_after",
                                                          "attempts")])
        return out

    def trace(self, label: str, trace: dict[str, Any]) -> tuple[list[Any], bool]:
        """The encoded trace and whether any role in it failed."""
        family = label.split(" · ")[0]  # an eval's turns add up under their system
        layers: list[list[Any]] = []
        failed = False
        last: list[dict[str, Any]] = []
        for layer in trace.get("layers") or []:
            responses = layer.get("responses") or []
            texts = [r.get("text") if r.get("error") is None else None for r in responses]
            agree = agreement(texts)
            layers.append([self.response(r, _round(a), label=family, aggregator=False)
                           for r, a in zip(responses, agree, strict=True)])
            failed = failed or any(r.get("error") for r in responses)
            last = responses
        agg = trace.get("aggregator")
        encoded_agg = None
        if agg is not None:
            refs = [r.get("text") if r.get("error") is None else None for r in last]
            sims = closeness(agg.get("text") if agg.get("error") is None else None, refs)
            if (best := closest(sims)) is not None:
                self.totals[family, last[best]["role"], False].closest += 1
            encoded_agg = self.response(agg, [_round(s) for s in sims], label=family, aggregator=True)
            failed = failed or agg.get("error") is not None
        output = trace.get("output")
        same = agg is not None and output is not None and output == agg.get("text")
        return [label, True if same else output, trace.get("error"), layers, encoded_agg], failed


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def build_payload(source: Source) -> dict[str, Any]:
    """The report's data for ``source`` (similarities computed here, once, so the page only reads numbers)."""
    enc = _Encoder()
    systems = [s["name"] for s in source.eval.systems] if source.eval else []
    convs = [_conversation(enc, conv, systems) for conv in source.conversations]
    payload: dict[str, Any] = {
        "v": VERSION, "kind": source.kind, "path": source.path, "similarity": DESCRIPTION, "notes": source.notes,
        "names": enc.names, "roles": [t.row() for t in enc.totals.values()], "eval": None, "convs": convs,
    }
    if source.eval:
        ev = source.eval
        payload["eval"] = {"suite": ev.suite, "metric": ev.metric, "percent": ev.percent, "systems": ev.systems,
                           "best": systems.index(ev.best) if ev.best else None, "comparisons": ev.comparisons}
    return payload


def _conversation(enc: _Encoder, conv: Conversation, systems: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"i": conv.id, "u": [conv.prompt_tokens, conv.completion_tokens]}
    traces, role_failed = [], False
    for label, trace in conv.traces:
        encoded, failed = enc.trace(label, trace)
        traces.append(encoded)
        role_failed = role_failed or failed
    failed_conv = conv.error is not None or any(t[2] is not None for t in traces)
    optional = {"p": conv.prompt, "e": conv.error, "s": None if conv.seconds is None else round(conv.seconds, 3),
                "o": None if traces else conv.output, "t": traces or None,
                "f": 2 if failed_conv else 1 if role_failed else None, "w": conv.outcome}
    out.update({k: v for k, v in optional.items() if v is not None})
    if systems:
        out["sc"] = [conv.scores.get(s) for s in systems]
        out["a"] = [conv.answers.get(s) for s in systems]
    return out
