"""The trace viewer without a browser: similarity, reading the three formats (read-only), the embedded payload, the
HTML's safety, and the `moa-local view` command."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from moa_local.cli import app
from moa_local.errors import InputError
from moa_local.view import write_report
from moa_local.view.html import embed_json, render_report, static_text
from moa_local.view.payload import build_payload
from moa_local.view.similarity import agreement, closeness, closest, similarity
from moa_local.view.sources import read_source

DOCS_EVAL = Path(__file__).resolve().parents[2] / "docs" / "eval"


def response(role: str, text: str | None, *, error: str | None = None, model: str = "m", ct: int = 5,
             seconds: float = 1.0, attempts: int = 1) -> dict[str, Any]:
    return {"role": role, "model": model, "text": text, "error": error,
            "usage": {"prompt_tokens": 10, "completion_tokens": ct}, "seconds": seconds, "attempts": attempts}


def trace(a: str | None, b: str | None, answer: str | None, *, error: str | None = None) -> dict[str, Any]:
    return {"output": answer, "error": error,
            "layers": [{"index": 1, "responses": [response("p1", a), response("p2", b, error=None if b else "boom")]}],
            "aggregator": response("agg", answer) if answer is not None else None}


# -- similarity ---------------------------------------------------------------------------------------------------

def test_similarity_is_rouge1_f1_over_lowercased_words() -> None:
    assert similarity("The sky is blue.", "the SKY is blue") == 1.0
    assert similarity("red green", "blue yellow") == 0.0
    # shared {a, b} (a counted once: min(2, 1)), 4 + 3 words: 2 * 2 / 7
    assert similarity("a a b c", "a b d") == pytest.approx(4 / 7)
    assert similarity(None, "x") is None and similarity("", "") == 1.0


def test_agreement_skips_missing_answers_and_closest_picks_the_highest() -> None:
    assert agreement(["a b", "a b", None]) == [1.0, 1.0, None]
    assert agreement(["a b", None]) == [None, None]  # nobody to agree with
    scores = closeness("a b c", ["a b c", "x y", None])
    assert scores == [1.0, 0.0, None] and closest(scores) == 0
    assert closest([None, None]) is None and closest([0.0, 0.0]) == 0


# -- sources ------------------------------------------------------------------------------------------------------

def test_batch_output_with_a_torn_last_line_is_read_without_touching_the_file(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    lines = [json.dumps({"id": "a", "output": "x", "error": None, "usage": {"prompt_tokens": 1, "completion_tokens": 2},
                         "seconds": 0.5, "trace": trace("one two", "one three", "x")}),
             json.dumps({"id": "b", "output": None, "error": "failed", "usage": {}, "seconds": 0.1})]
    text = "\n".join(lines) + '\n{"id": "c", "outp'
    out.write_text(text)
    src = read_source(out)
    assert src.kind == "batch" and [c.id for c in src.conversations] == ["a", "b"]
    assert any("line 3" in n and "incomplete" in n for n in src.notes)
    assert out.read_text() == text  # a viewer never cuts a file a job may still be writing


def test_a_bad_line_in_the_middle_names_its_number(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": 1, "output": "x"}\nnot json\n{"id": 2, "output": "y"}\n')
    with pytest.raises(InputError, match="line 2 is not valid JSON"):
        read_source(out)
    out.write_text('{"id": 1}\n[1, 2]\n')
    with pytest.raises(InputError, match="line 2 is not a result record"):
        read_source(out)


def test_batch_prompts_come_from_the_input_file(tmp_path: Path) -> None:
    out, inp = tmp_path / "out.jsonl", tmp_path / "in.jsonl"
    out.write_text(json.dumps({"id": 7, "output": "x", "trace": trace("a", "b", "x")}) + "\n")
    inp.write_text(json.dumps({"id": 7, "messages": [{"role": "system", "content": "Be brief."},
                                                     {"role": "user", "content": "Hi"}]}) + "\n")
    (conv,) = read_source(out, input=inp).conversations
    assert conv.prompt == "system: Be brief.\n\nuser: Hi"
    (conv,) = read_source(out).conversations
    assert conv.prompt is None


def test_a_trace_file_is_one_conversation_with_its_usage_added_up(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    path.write_text(json.dumps(trace("a b", "a c", "a b")))
    src = read_source(path)
    (conv,) = src.conversations
    assert src.kind == "trace" and conv.id == "t" and conv.completion_tokens == 15 and conv.prompt_tokens == 30


def test_eval_folder_outcomes_match_the_scores_against_the_best_single_system() -> None:
    folder = DOCS_EVAL / "math"
    rows = [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]
    src = read_source(folder)
    assert src.kind == "eval" and src.eval is not None and src.eval.best == "aggregator:smollm2-135m-instruct"
    best = {r["item"]: r["score"] for r in rows if r["system"] == src.eval.best}
    moa = {r["item"]: r["score"] for r in rows if r["system"] == "moa"}
    by_id = {c.id: c for c in src.conversations}
    assert len(by_id) == 200 and by_id["gsm_symbolic-0"].prompt.startswith("Prof. Williams")  # type: ignore[union-attr]
    for item, conv in by_id.items():
        assert conv.outcome == (moa[item] > best[item]) - (moa[item] < best[item])
        assert [label for label, _ in conv.traces] == ["moa", "self-moa:smollm2"]
    assert read_source(folder / "results.jsonl").kind == "eval"  # the results file itself works too


def test_a_folder_without_results_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="without results.jsonl"):
        read_source(tmp_path)


# -- payload and html ---------------------------------------------------------------------------------------------

def test_payload_marks_failures_interns_names_and_computes_similarity(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    rows = [{"id": "ok", "output": "a b", "trace": trace("a b", "a c", "a b")},
            {"id": "partial", "output": "a b", "trace": trace("a b", None, "a b")},
            {"id": "failed", "output": None, "error": "too few", "trace": trace(None, None, None, error="too few")}]
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = build_payload(read_source(out))
    ok, partial, failed = data["convs"]
    assert "f" not in ok and partial["f"] == 1 and failed["f"] == 2
    label, output, error, layers, agg = ok["t"][0]
    assert output is True  # the output is the aggregator's text, not stored twice
    assert [data["names"][r[0]] for r in layers[0]] == ["p1", "p2"] and data["names"].count("m") == 1
    assert layers[0][0][8] == 0.5 and layers[0][1][8] == 0.5  # {a,b} vs {a,c}: 2*1/4
    assert agg[8] == [1.0, 0.5]
    assert partial["t"][0][3][0][1][3] == "boom" and partial["t"][0][4][8] == [1.0, None]
    roles = {r["role"]: r for r in data["roles"]}
    assert roles["p2"]["failed"] == 2 and roles["p1"]["closest"] == 2 and roles["agg"]["agg"] is True


def test_model_text_cannot_break_out_of_the_page(tmp_path: Path) -> None:
    evil = "</script><script>alert(1)</script> {{script}} {{data}}"
    out = tmp_path / "out.jsonl"
    out.write_text(json.dumps({"id": evil, "output": evil, "trace": trace(evil, "b", evil)}) + "\n")
    html = render_report(build_payload(read_source(out)), title=evil)
    assert "<script>alert(1)" not in html and html.count("</script>") == 2  # the data's and the program's
    data = re.search(r'<script id="moa-data" type="application/json">(.*?)</script>', html, re.S)
    assert data is not None and json.loads(data.group(1))["convs"][0]["i"] == evil  # slots left as text
    assert "Content-Security-Policy" in html and "default-src 'none'" in html
    assert embed_json({"a": "<b>"}) == '{"a":"\\u003cb>"}'
    assert "innerHTML" not in static_text("report.js")  # the script builds text nodes only


def test_view_command_writes_the_report_and_refuses_to_overwrite_its_input(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    out.write_text(json.dumps({"id": "a", "output": "x", "trace": trace("a", "b", "x")}) + "\n")
    result = CliRunner().invoke(app, ["view", str(out)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out.html").read_text().startswith("<!doctype html>")
    with pytest.raises(InputError, match="would overwrite"):
        write_report(out, out)
    result = CliRunner().invoke(app, ["view", str(tmp_path / "missing.jsonl")])
    assert result.exit_code != 0


def test_a_two_turn_eval_with_a_failed_moa_item(tmp_path: Path) -> None:
    """MT-Bench shape: two turns per item, so two traces per system; MoA failed one item; scores 1-10."""
    def row(system: str, family: str, item: str, score: float | None, traces: list[Any], error: str | None = None
            ) -> dict[str, Any]:
        return {"id": f"{system}|{item}", "system": system, "family": family, "model": "m", "item": item,
                "score": score, "details": {"ratings": [score, score]}, "answers": ["one", "two"],
                "errors": [error, None], "judgments": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4},
                "seconds": 1.0, "judge_seconds": 0.0, "trace": traces, "suite": "mtbench", "recipe": "r"}
    two = [trace("a b", "a c", "a b"), trace("x", "y", "x")]
    rows = [row("moa", "moa", "81", 7.0, two), row("moa", "moa", "82", None, [trace(None, None, None, error="down"), None],
                                                    error="down"),
            row("proposer:p1", "proposer", "81", 5.0, [None, None]), row("proposer:p1", "proposer", "82", 6.0, [None, None]),
            row("aggregator:agg", "aggregator", "81", 8.0, [None, None]),
            row("aggregator:agg", "aggregator", "82", 2.0, [None, None])]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    src = read_source(tmp_path)
    assert src.eval is not None and src.eval.best == "proposer:p1" and not src.eval.percent  # mean 5.5 vs 5.0
    by_id = {c.id: c for c in src.conversations}
    assert [label for label, _ in by_id["81"].traces] == ["moa · turn 1", "moa · turn 2"]
    assert by_id["81"].outcome == 1 and by_id["82"].outcome is None  # 7 > 5; an unscored item has no outcome
    assert by_id["82"].error == "down"
    data = build_payload(src)
    conv82 = next(c for c in data["convs"] if c["i"] == "82")
    assert conv82["f"] == 2 and conv82["sc"] == [None, 6.0, 2.0]
    assert {r["label"] for r in data["roles"]} == {"moa"}  # both turns add up under the system


def test_the_sample_is_real_batch_records_with_the_failures_it_promises(tmp_path: Path) -> None:
    from moa_local.view.sample import FAILED_EVERY, PARTIAL_EVERY, write_sample

    n = 2 * FAILED_EVERY
    source, output = write_sample(tmp_path, n)
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert [r["id"] for r in rows] == [json.loads(line)["id"] for line in source.read_text().splitlines()]
    failed = [r for r in rows if r["error"]]
    partial = [r for r in rows if not r["error"] and any(x["error"] for layer in r["trace"]["layers"]
                                                          for x in layer["responses"])]
    assert len(failed) == n // FAILED_EVERY and len(partial) == n // PARTIAL_EVERY - n // FAILED_EVERY
    assert all(len(r["output"].split()) >= 40 for r in rows if not r["error"])
