"""The eval report: from an output folder's results.jsonl and run.json to report.md (per-system table with 95%
bootstrap CIs, tokens and wall time; MoA minus the best single model with a paired-bootstrap CI) and scores.png
(bars with CI whiskers, matplotlib's Agg backend).

Reads files and draws; never runs a model, so a report can be rebuilt at any time (`moa-local eval --report-only`).
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moa_local.errors import InputError
from moa_local.eval.base import get_suite
from moa_local.eval.bootstrap import Interval, PairedDifference, bootstrap_mean, paired_difference
from moa_local.eval.results import PLOT, REPORT, load_records, read_run_info

_ORDER = {"moa": 0, "self-moa": 1, "proposer": 2, "aggregator": 3}
_COLORS = {"moa": "#1f77b4", "self-moa": "#9467bd", "proposer": "#7f7f7f", "aggregator": "#bcbd22"}


@dataclass
class SystemRow:
    """One system's line of the report."""

    name: str
    family: str
    model: str
    interval: Interval | None
    items: int
    failed: int
    completion_tokens: int
    prompt_tokens: int
    seconds: float
    judge_seconds: float
    extra: dict[str, float] = field(default_factory=dict)


@dataclass
class Comparison:
    """A paired difference a - b over the items both systems scored."""

    label: str
    a: str
    b: str
    diff: PairedDifference | None


@dataclass
class Report:
    suite: str
    metric: str
    scale: tuple[float, float]
    recipe: str
    rows: list[SystemRow]
    comparisons: list[Comparison]
    run_info: dict[str, Any]

    def row(self, name: str) -> SystemRow | None:
        return next((r for r in self.rows if r.name == name), None)

    def best_single(self) -> SystemRow | None:
        singles = [r for r in self.rows if r.family in ("proposer", "aggregator") and r.interval is not None]
        return max(singles, key=lambda r: r.interval.mean if r.interval else 0.0, default=None)


def build_report(folder: Path) -> Report:
    """Summarize every system in ``folder``. Raises InputError when there are no results yet."""
    records = load_records(folder)
    if not records:
        raise InputError(f"no results in {folder}; run `moa-local eval` with --output {folder} first")
    return summarize(records, read_run_info(folder))


def summarize(records: list[dict[str, Any]], info: dict[str, Any]) -> Report:
    """Summarize records already read (non-empty): the rows, the best single model, the paired comparisons."""
    suite = get_suite(records[0]["suite"])
    by_system: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_system.setdefault(r["system"], []).append(r)
    rows = []
    for name, rs in by_system.items():
        values = [r["score"] for r in rs if r["score"] is not None]
        rows.append(SystemRow(
            name=name, family=rs[0]["family"], model=rs[0]["model"],
            interval=bootstrap_mean(values) if values else None, items=len(rs),
            failed=sum(1 for r in rs if any(e for e in r.get("errors") or [])),
            completion_tokens=sum(r["usage"]["completion_tokens"] for r in rs),
            prompt_tokens=sum(r["usage"]["prompt_tokens"] for r in rs),
            seconds=sum(r["seconds"] for r in rs), judge_seconds=sum(r.get("judge_seconds", 0.0) for r in rs),
            extra=suite.summary(rs),
        ))
    first_seen = {name: i for i, name in enumerate(by_system)}  # run order: the recipe's proposer order
    rows.sort(key=lambda r: (_ORDER.get(r.family, 9), first_seen[r.name]))
    report = Report(suite=suite.name, metric=suite.metric, scale=suite.scale, recipe=records[0]["recipe"],
                    rows=rows, comparisons=[], run_info=info)
    report.comparisons = _comparisons(report, by_system)
    return report


def _paired(by_system: dict[str, list[dict[str, Any]]], a: str, b: str) -> PairedDifference | None:
    sa = {r["item"]: r["score"] for r in by_system[a] if r["score"] is not None}
    sb = {r["item"]: r["score"] for r in by_system[b] if r["score"] is not None}
    common = [k for k in sa if k in sb]
    if not common:
        return None
    return paired_difference([sa[k] for k in common], [sb[k] for k in common])


def _comparisons(report: Report, by_system: dict[str, list[dict[str, Any]]]) -> list[Comparison]:
    out = []
    best = report.best_single()
    self_moa = next((r for r in report.rows if r.family == "self-moa"), None)
    if report.row("moa") is not None:
        if best is not None:
            out.append(Comparison(f"MoA − best single model ({best.name})", "moa", best.name,
                                  _paired(by_system, "moa", best.name)))
        else:  # kept in the table so its absence is visible
            out.append(Comparison("MoA − best single model (no single model was scored)", "moa", "", None))
    if best is not None and self_moa is not None:
        out.append(Comparison(f"Self-MoA of {self_moa.name.split(':', 1)[1]} − best single model ({best.name})", self_moa.name, best.name,
                              _paired(by_system, self_moa.name, best.name)))
    if self_moa is not None and report.row("moa") is not None:
        out.append(Comparison(f"MoA − Self-MoA of {self_moa.name.split(':', 1)[1]}", "moa", self_moa.name,
                              _paired(by_system, "moa", self_moa.name)))
    return out


# -- rendering ----------------------------------------------------------------------------------------------------


def _percent(report: Report) -> bool:
    return report.scale == (0.0, 1.0)


def fmt_score(report: Report, value: float) -> str:
    return f"{100 * value:.1f}%" if _percent(report) else f"{value:.2f}"


def fmt_diff(report: Report, value: float) -> str:
    return f"{100 * value:+.1f} pp" if _percent(report) else f"{value:+.2f}"


def render_markdown(report: Report) -> str:
    info = report.run_info
    lines = [f"# {report.suite}: recipe `{report.recipe}` against its own models", ""]
    meta = [f"metric: **{report.metric}**", f"items in the run: {info.get('items', '?')}"
            + (f" (--limit {info['limit']})" if info.get("limit") else "")]
    most = max((r.items for r in report.rows), default=0)
    if info.get("items") and most < info["items"]:
        meta.append(f"**partial: at most {most} items per system were answered**")
    for key, label in (("backend", "backend"), ("judge", "judge"), ("reference", "reference"),
                       ("machine", "machine"), ("date", "date"), ("command", "command")):
        if info.get(key):
            meta.append(f"{label}: `{info[key]}`" if key == "command" else f"{label}: {info[key]}")
    lines += [" · ".join(meta), ""]
    lines += ["| system | model | score | 95% CI | scored / items | failed | generated tokens | tokens / item "
              "| prompt tokens | wall s | s / item |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report.rows:
        iv = r.interval
        score = fmt_score(report, iv.mean) if iv else "—"
        ci = f"[{fmt_score(report, iv.low)}, {fmt_score(report, iv.high)}]" if iv else "—"
        scored = iv.n if iv else 0
        name = f"**{r.name}**" if r.family == "moa" else r.name
        lines.append(f"| {name} | {r.model} | {score} | {ci} | {scored} / {r.items} | {r.failed} | {r.completion_tokens:,} "
                     f"| {r.completion_tokens / max(1, r.items):.0f} | {r.prompt_tokens:,} | {r.seconds:.0f} "
                     f"| {r.seconds / max(1, r.items):.2f} |")
    if info.get("proposers_from_moa"):
        lines += ["", "The `proposer:*` rows are MoA's own layer-1 answers (`--proposers-from-moa`): the same request "
                  "each proposer alone gets, one sample, read from MoA's trace; their wall s is the slowest layer-1 "
                  "request of each batch, inside MoA's time."]
    if any(r.judge_seconds for r in report.rows):
        lines += ["", "Judge time (not in wall s): " + ", ".join(f"{r.name} {r.judge_seconds:.0f} s" for r in report.rows)]
    lines += ["", "## Paired differences", "",
              "Paired bootstrap over the items both systems scored (10,000 resamples, seed 0). "
              "P(≤ 0) is the share of resamples where the first system does not beat the second.", "",
              "| comparison | difference | 95% CI | items | P(≤ 0) |", "|---|---|---|---|---|"]
    if not report.comparisons:
        lines.append("| (no MoA results in this folder) | — | — | 0 | — |")
    for c in report.comparisons:
        if c.diff is None:
            lines.append(f"| {c.label} | — | — | 0 | — |")
            continue
        d = c.diff
        lines.append(f"| {c.label} | {fmt_diff(report, d.mean)} | [{fmt_diff(report, d.low)}, {fmt_diff(report, d.high)}] "
                     f"| {d.n} | {d.p_not_better:.3f} |")
    keys = sorted({k for r in report.rows for k in r.extra})
    if keys:
        lines += ["", "## Suite metrics", "", "| system | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
        for r in report.rows:
            cells = [(f"{100 * r.extra[k]:.1f}%" if _is_share(k) else f"{r.extra[k]:.2f}") if k in r.extra else "—"
                     for k in keys]
            lines.append(f"| {r.name} | " + " | ".join(cells) + " |")
    lines += ["", f"![scores]({PLOT})", ""]
    return "\n".join(lines)


def _is_share(key: str) -> bool:
    return any(w in key for w in ("accuracy", "share", "strict", "loose"))


def plot_scores(report: Report, path: Path) -> None:
    """Bar chart, one bar per system, whiskers at the 95% CI. Uses the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report.rows if r.interval is not None]
    scale = 100.0 if _percent(report) else 1.0
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(rows) + 2), 4.2), dpi=120)
    xs = list(range(len(rows)))
    means = [r.interval.mean * scale for r in rows if r.interval]
    lows = [(r.interval.mean - r.interval.low) * scale for r in rows if r.interval]
    highs = [(r.interval.high - r.interval.mean) * scale for r in rows if r.interval]
    ax.bar(xs, means, yerr=[lows, highs], capsize=5, color=[_COLORS.get(r.family, "#333333") for r in rows])
    for x, m in zip(xs, means, strict=True):
        ax.annotate(f"{m:.1f}" if scale == 100 else f"{m:.2f}", (x, m), textcoords="offset points", xytext=(8, 3),
                    fontsize=8)
    ax.set_xticks(xs, [r.name for r in rows], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(report.metric + (" (%)" if scale == 100 else ""), fontsize=9)
    top = report.scale[1] * scale  # zoomed in when every score is low, so small bars and whiskers stay visible
    highest = max((r.interval.high * scale for r in rows if r.interval), default=top)
    ax.set_ylim(0, min(top, max(1.25 * highest, 0.05 * top)))
    ax.set_title(f"{report.suite} · recipe {report.recipe} · 95% bootstrap CI", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(folder: Path, *, extra_info: dict[str, Any] | None = None) -> Report:
    """Build the report of ``folder`` and write report.md and scores.png there."""
    report = build_report(folder)
    if extra_info:
        report.run_info = {**report.run_info, **extra_info}
    report.run_info.setdefault("date", _dt.date.today().isoformat())
    (folder / REPORT).write_text(render_markdown(report), encoding="utf-8")
    plot_scores(report, folder / PLOT)
    return report


def summary_rows(report: Report) -> Sequence[tuple[str, str, str, str]]:
    """(system, score, CI, scored/items) for a terminal table."""
    out = []
    for r in report.rows:
        iv = r.interval
        out.append((r.name, fmt_score(report, iv.mean) if iv else "—",
                    f"[{fmt_score(report, iv.low)}, {fmt_score(report, iv.high)}]" if iv else "—",
                    f"{iv.n if iv else 0}/{r.items}"))
    return out
