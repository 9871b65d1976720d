"""The job a forecast is for: how many conversations, how long each request's prompt is, how much each role writes.

Owns the token counts of a batch job before it runs: every role's layer-1 prompt per conversation (the conversation
rendered in its model's prompt format, with the role's system prompt), the tokens the aggregate prompt adds in later
layers (beyond the references themselves), and each role's output length: ``max_tokens`` as the bound, or the mean a
previous run measured (a batch output JSONL, per role when its lines carry traces, or a ``--trace`` file).

Prompt lengths come from the real prompts when ``--input`` is given: counted with the model's own tokenizer when its
weights folder holds ``tokenizer.json`` (the light ``tokenizers`` package; chat templates rendered with jinja2), else
estimated as characters / 4. A large input is sampled (evenly spaced lines). Never imports torch or vllm, never
loads weights, never schedules (forecast.py does).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from moa_local.config.model import ModelConfig
from moa_local.config.recipe import Recipe, Role
from moa_local.config.registry import load_model_config
from moa_local.errors import InputError
from moa_local.prompts import Message, inject_references, render_prompt

CHARS_PER_TOKEN = 4.0
"""The estimate when a model's tokenizer is not on disk: ~4 characters of English per token."""

SAMPLE_CONVERSATIONS = 1000
"""At most this many conversations of an input are tokenized (evenly spaced); the rest are assumed alike."""

DEFAULT_PROMPT_TOKENS = 256
"""A conversation's own tokens (system prompt, template, turns) when neither --input nor --prompt-tokens says."""

MESSAGE_OVERHEAD_TOKENS = 4
"""Chat-template tokens per message (role markers) when the template cannot be rendered."""


@dataclass(frozen=True)
class Workload:
    """Token counts of a job, per role. Stage k = 1..layers is a proposer layer, layers + 1 the aggregation."""

    conversations: int
    base_tokens: dict[str, list[int]]
    """Role name -> layer-1 prompt tokens of each sampled conversation (cycled over the job)."""
    reference_overhead: dict[str, float]
    """Role name -> tokens the aggregate prompt adds around the references in layers > 1 (and the aggregation)."""
    outputs: dict[tuple[int, str], float]
    """(stage, role name) -> generated tokens per request."""
    prompt_source: str
    output_source: str
    notes: list[str] = field(default_factory=list)
    output_samples: dict[tuple[int, str], list[int]] = field(default_factory=dict)
    """(stage, role name) -> the lengths a previous run measured, replayed one per conversation (answers of
    different lengths finish at different times); empty: every request writes the mean."""

    def base(self, role: str, conversation: int) -> int:
        lengths = self.base_tokens[role]
        return lengths[conversation % len(lengths)]

    def output(self, stage: int, role: str) -> float:
        """Mean generated tokens of a request."""
        return self.outputs[(stage, role)]

    def output_of(self, stage: int, role: str, conversation: int) -> float:
        """Generated tokens of this conversation's request: a measured length when there are samples (each role
        walks them with its own offset, so one conversation's roles are not all long or all short), else the mean."""
        samples = self.output_samples.get((stage, role))
        if not samples:
            return self.outputs[(stage, role)]
        offset = sum(map(ord, role)) * 7 + stage * 13
        return float(samples[(conversation * 7919 + offset) % len(samples)])

    def to_dict(self) -> dict[str, Any]:
        return {
            "conversations": self.conversations,
            "prompt_source": self.prompt_source,
            "output_source": self.output_source,
            "mean_prompt_tokens": {r: round(sum(v) / len(v), 1) for r, v in self.base_tokens.items()},
            "output_tokens": {f"{s}:{r}": round(v, 1) for (s, r), v in sorted(self.outputs.items())},
            "notes": list(self.notes),
        }


# -- counting tokens --------------------------------------------------------------------------------------------


class TokenCounter:
    """Counts the tokens of a model's rendered prompts: its tokenizer (and chat template) when on disk, else chars/4."""

    def __init__(self, model: ModelConfig) -> None:
        self.model = model
        self.tokenizer: Any = None
        self.template: Any = None
        self.special: dict[str, str] = {}
        folder = _model_folder(model)
        if folder is not None and (folder / "tokenizer.json").is_file():
            self.tokenizer = _load_tokenizer(str(folder / "tokenizer.json"))
            if model.prompt_format == "chat_template":
                self.template, self.special = _load_template(folder)
        self.exact = self.tokenizer is not None and (model.prompt_format != "chat_template" or self.template is not None)

    @property
    def method(self) -> str:
        if self.exact:
            return "tokenizer"
        return "tokenizer, template estimated" if self.tokenizer is not None else "chars/4"

    def count(self, messages: list[Message]) -> int:
        if self.model.prompt_format != "chat_template":
            rendered = render_prompt(messages, prompt_format=self.model.prompt_format)
            return self._text(rendered.text) + (1 if rendered.add_special_tokens else 0)
        if self.template is not None:
            try:
                text = self.template.render(messages=messages, add_generation_prompt=True, **self.special)
                return self._text(text)
            except Exception:  # noqa: BLE001 - a template our renderer cannot run: estimate instead
                self.template = None
                self.exact = False
        return sum(self._text(m["content"]) + MESSAGE_OVERHEAD_TOKENS for m in messages) + MESSAGE_OVERHEAD_TOKENS

    def _text(self, text: str) -> int:
        if self.tokenizer is not None:
            return len(self.tokenizer.encode(text, add_special_tokens=False).ids)
        return math.ceil(len(text) / CHARS_PER_TOKEN)


def _model_folder(model: ModelConfig) -> Path | None:
    from moa_local.models.prepare import model_path  # light: pathlib and the registry

    path = model_path(model)
    return path if path.is_dir() else None


@lru_cache(maxsize=16)
def _load_tokenizer(path: str) -> Any:
    try:
        from tokenizers import Tokenizer
    except ImportError:
        return None
    try:
        return Tokenizer.from_file(path)
    except Exception:  # noqa: BLE001 - an unreadable tokenizer means "estimate"
        return None


def _load_template(folder: Path) -> tuple[Any, dict[str, str]]:
    """The model's chat template as a jinja2 template (sandboxed, as transformers renders it), or None."""
    config: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    source = config.get("chat_template")
    if not isinstance(source, str) and (folder / "chat_template.jinja").is_file():
        source = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if not isinstance(source, str):
        return None, {}
    try:
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        return None, {}

    def raise_exception(message: str) -> None:
        raise ValueError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    special = {k: v for k in ("bos_token", "eos_token") if isinstance(v := config.get(k), str)}
    try:
        return env.from_string(source), special
    except Exception:  # noqa: BLE001 - a template jinja cannot parse: estimate instead
        return None, {}


# -- the job's prompts ------------------------------------------------------------------------------------------


def _sample_input(path: Path, limit: int) -> tuple[int, list[list[Message]]]:
    """(lines in the file, up to ``limit`` conversations evenly spaced through it). Bad lines raise InputError."""
    from moa_local.batch.jsonl import parse_line  # validates exactly as `run --input` does

    if not path.is_file():
        raise InputError(f"input file {path} does not exist")
    offsets: list[int] = []
    with path.open("rb") as fh:
        position = 0
        for raw in fh:
            if raw.strip():
                offsets.append(position)
            position += len(raw)
    if not offsets:
        raise InputError(f"input file {path} holds no records")
    step = max(1.0, len(offsets) / limit)
    chosen = sorted({int(i * step) for i in range(min(limit, len(offsets)))})
    conversations: list[list[Message]] = []
    with path.open("rb") as fh:
        for index in chosen:
            fh.seek(offsets[index])
            try:
                obj = json.loads(fh.readline())
            except ValueError:
                raise InputError(f"{path}: record {index + 1} is not valid JSON") from None
            conversations.append(parse_line(obj, line=index + 1).messages)
    return len(offsets), conversations


def _roles(recipe: Recipe) -> list[Role]:
    return [*recipe.proposer_roles(), recipe.aggregator_role()]


def _counters(recipe: Recipe) -> dict[str, TokenCounter]:
    return {m: TokenCounter(load_model_config(m)) for m in recipe.model_ids()}


def _overheads(recipe: Recipe, counters: dict[str, TokenCounter], samples: Sequence[list[Message]]) -> dict[str, float]:
    """Tokens the aggregate prompt adds to each role's prompt beyond the references (empty references counted)."""
    n = len(recipe.proposer_roles())
    out: dict[str, float] = {}
    for role in _roles(recipe):
        counter = counters[role.model]
        extra = [counter.count(inject_references(m, [""] * n, system_prompt=role.system_prompt))
                 - counter.count(inject_references(m, [], system_prompt=role.system_prompt)) for m in samples[:8]]
        out[str(role.name)] = max(0.0, sum(extra) / len(extra))
    return out


def prompt_tokens_from_input(recipe: Recipe, path: Path, *, limit: int = SAMPLE_CONVERSATIONS
                             ) -> tuple[int, dict[str, list[int]], dict[str, float], str]:
    """(conversations in the file, per-role layer-1 prompt tokens of a sample, per-role aggregate overhead,
    a description of how they were counted)."""
    total, samples = _sample_input(path, limit)
    counters = _counters(recipe)
    base = {str(r.name): [counters[r.model].count(inject_references(m, [], system_prompt=r.system_prompt))
                          for m in samples] for r in _roles(recipe)}
    methods = ", ".join(f"{m}: {c.method}" for m, c in counters.items())
    sampled = f" (a sample of {len(samples):,} of {total:,})" if len(samples) < total else ""
    return total, base, _overheads(recipe, counters, samples), f"{path.name}{sampled}; {methods}"


def prompt_tokens_given(recipe: Recipe, tokens: int) -> tuple[dict[str, list[int]], dict[str, float], str]:
    """Every conversation ``tokens`` long for every role; the aggregate prompt's own tokens counted on a stand-in."""
    counters = _counters(recipe)
    stand_in = [[{"role": "user", "content": "x"}]]
    return ({str(r.name): [tokens] for r in _roles(recipe)}, _overheads(recipe, counters, stand_in),
            f"{tokens} tokens per conversation (given)")


# -- the roles' outputs -----------------------------------------------------------------------------------------


def _records(path: Path) -> Iterator[dict[str, Any]]:
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if stripped.startswith("{") and "\n{" not in stripped.rstrip():
        try:
            yield json.loads(stripped)  # one JSON document: a --trace file
            return
        except ValueError:
            pass
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                yield json.loads(line)
            except ValueError:
                raise InputError(f"{path}: line {number} is not JSON; give a batch output JSONL or a --trace file") from None


def measured_outputs(recipe: Recipe, path: Path) -> tuple[dict[tuple[int, str], float], str,
                                                         dict[tuple[int, str], list[int]]]:
    """Mean generated tokens per (stage, role) from a previous run, a description, and the measured lengths per
    (stage, role): per role from traces (a ``--trace`` file, or batch lines written with --trace), else each line's
    total split over the roles in proportion to max_tokens (no lengths then)."""
    if not path.is_file():
        raise InputError(f"--outputs-from {path} does not exist; give a batch output JSONL or a --trace file")
    agg = str(recipe.aggregator_role().name)
    per_role: dict[tuple[int, str], list[int]] = {}
    totals: list[int] = []
    for record in _records(path):
        if record.get("error"):
            continue
        trace = record.get("trace", record if "layers" in record else None)
        if isinstance(trace, dict):
            for layer in trace.get("layers") or []:
                for r in layer.get("responses") or []:
                    if r.get("error") is None:
                        per_role.setdefault((int(layer["index"]), str(r["role"])), []).append(
                            int(r["usage"]["completion_tokens"]))
            a = trace.get("aggregator")
            if isinstance(a, dict) and a.get("error") is None:
                per_role.setdefault((recipe.layers + 1, agg), []).append(int(a["usage"]["completion_tokens"]))
        elif isinstance(record.get("usage"), dict):
            totals.append(int(record["usage"].get("completion_tokens", 0)))
    bound = bound_outputs(recipe)
    if per_role:
        out = {k: sum(v) / len(v) for k, v in per_role.items() if k in bound}
        missing = [k for k in bound if k not in out]
        for k in missing:
            out[k] = bound[k]
        note = f"; {len(missing)} role(s) not in it at max_tokens" if missing else ""
        return out, f"measured per role in {path.name}{note}", {k: v for k, v in per_role.items() if k in bound}
    if not totals:
        raise InputError(f"{path} holds no successful records with usage; give a batch output JSONL or a --trace file")
    factor = (sum(totals) / len(totals)) / sum(bound.values())
    return ({k: v * min(1.0, factor) for k, v in bound.items()},
            f"measured mean per conversation from {path.name} ({sum(totals) / len(totals):.0f} tokens), split "
            "over the roles in proportion to max_tokens", {})


def bound_outputs(recipe: Recipe) -> dict[tuple[int, str], float]:
    """Every request writes its role's max_tokens: the bound."""
    out: dict[tuple[int, str], float] = {}
    for stage in range(1, recipe.layers + 1):
        for role in recipe.proposer_roles():
            out[(stage, str(role.name))] = float(role.sampling.max_tokens)
    aggregator = recipe.aggregator_role()
    out[(recipe.layers + 1, str(aggregator.name))] = float(aggregator.sampling.max_tokens)
    return out


def build_workload(recipe: Recipe, *, prompts: int | None = None, input: Path | None = None,
                   prompt_tokens: int | None = None, outputs_from: Path | None = None) -> Workload:
    """The job: ``prompts`` conversations (default: the lines of ``input``), their prompt lengths from ``input`` or
    ``prompt_tokens`` (default DEFAULT_PROMPT_TOKENS), outputs at max_tokens or measured in ``outputs_from``."""
    notes: list[str] = []
    if input is not None:
        total, base, overhead, source = prompt_tokens_from_input(recipe, input)
        if prompt_tokens is not None:
            notes.append("--prompt-tokens ignored: the prompts of --input are counted")
    else:
        if prompts is None:
            raise InputError("say how many conversations: --prompts N, or --input FILE.jsonl")
        given = prompt_tokens if prompt_tokens is not None else DEFAULT_PROMPT_TOKENS
        if given < 1:
            raise InputError(f"--prompt-tokens must be at least 1, got {given}")
        base, overhead, source = prompt_tokens_given(recipe, given)
        total = prompts
        if prompt_tokens is None:
            source += " (assumed; give --prompt-tokens or --input)"
    n = prompts if prompts is not None else total
    if n < 1:
        raise InputError(f"--prompts must be at least 1, got {n}")
    samples: dict[tuple[int, str], list[int]] = {}
    if outputs_from is not None:
        outputs, out_source, samples = measured_outputs(recipe, outputs_from)
    else:
        outputs, out_source = bound_outputs(recipe), "max_tokens of each role (the bound: answers may stop sooner)"
    return Workload(conversations=n, base_tokens=base, reference_overhead=overhead, outputs=outputs,
                    prompt_source=source, output_source=out_source, notes=notes, output_samples=samples)
