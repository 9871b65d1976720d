"""Fuzzing what users hand us: recipe YAML and batch JSONL lines. Whatever the input, the answer is a value or one of
our own errors (one line for the CLI), never another exception."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moa_local.batch.jsonl import iter_input
from moa_local.config import load_recipe
from moa_local.errors import InputError, MoaError

TEXT = st.text(max_size=20)
SCALAR = st.none() | st.booleans() | st.integers(-10, 10**6) | st.floats(allow_nan=False, allow_infinity=False) | TEXT
VALUE = st.recursive(SCALAR, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
                     max_leaves=10)
RECIPE_KEYS = st.sampled_from(["name", "layers", "proposers", "aggregator", "policy", "aggregation", "chunk_tokens",
                               "engines", "backend", "cluster", "description"])
ROLE = st.fixed_dictionaries({"model": st.sampled_from(["smollm2-135m-instruct", "gemma3-270m", "/etc/passwd",
                                                        "../x", "no-such", ""])},
                             optional={"name": TEXT, "sampling": VALUE, "samples": VALUE, "system_prompt": VALUE})
RECIPE = st.fixed_dictionaries({"proposers": st.lists(ROLE, max_size=3), "aggregator": ROLE}) | VALUE


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(base=RECIPE, extra=st.dictionaries(RECIPE_KEYS, VALUE, max_size=4))
def test_any_recipe_loads_or_is_a_recipe_error(tmp_path: Path, base: object, extra: dict[str, object]) -> None:
    data = {**base, **extra} if isinstance(base, dict) else base
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    try:
        load_recipe(path)
    except MoaError as exc:
        assert str(exc) and "\n" not in str(exc).strip().split(". ")[0]


LINE = (st.dictionaries(st.sampled_from(["id", "prompt", "messages", "instruction", "other"]), VALUE, max_size=4)
        .map(json.dumps) | VALUE.map(json.dumps) | st.binary(max_size=60).map(lambda b: b.decode("latin-1")))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(LINE, min_size=1, max_size=4))
def test_any_jsonl_line_parses_or_names_its_line(tmp_path: Path, lines: list[str]) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(line.replace("\n", " ") for line in lines) + "\n", encoding="utf-8",
                    errors="surrogatepass")
    try:
        records = list(iter_input(path))
    except InputError as exc:
        assert "line " in str(exc)
        return
    for record in records:
        assert record.messages and record.messages[-1]["role"] == "user" and record.id
