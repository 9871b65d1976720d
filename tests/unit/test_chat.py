"""The terminal chat on the fake backend: driven through its loop with fake IO, and once as a real subprocess."""

from __future__ import annotations

import io
import subprocess
import sys

from moa_local.api import MoA
from moa_local.chat import run_repl
from moa_local.config.recipe import FakeOptions, Recipe
from moa_local.engines.fake import fake_pool


def chat(recipe: Recipe, lines: list[str], **fake: object) -> tuple[str, str, MoA]:
    pool = fake_pool(recipe)
    for engine in pool.engines.values():
        engine.options = FakeOptions(**fake)  # type: ignore[arg-type,attr-defined]
    moa = MoA(recipe, pool, backend="fake")
    out, err = io.StringIO(), io.StringIO()
    assert run_repl(moa, stdin=io.StringIO("".join(f"{x}\n" for x in lines)), stdout=out, stderr=err) == 0
    return out.getvalue(), err.getvalue(), moa


def test_turns_keep_history_and_stream_answers(fake_recipe: Recipe) -> None:
    out, err, moa = chat(fake_recipe, ["Name a colour.", "Another one?"])
    answers = out.strip().splitlines()
    assert len(answers) == 2 and "Name a colour." in answers[0] and "Another one?" in answers[1]
    second = moa.runner.engines["smollm2-135m-instruct"].streams[-1]  # type: ignore[attr-defined]
    turns = [m for m in second.messages if m["role"] != "system"]
    assert [m["role"] for m in turns] == ["user", "assistant", "user"]
    assert turns[0]["content"] == "Name a colour." and turns[1]["content"] == answers[0]
    assert "layer 1/2: 2/2 proposers done" in err and "layer 2/2: 2/2 proposers done" in err


def test_reset_trace_unknown_command_and_exit(fake_recipe: Recipe) -> None:
    out, err, moa = chat(fake_recipe, ["/trace", "First?", "/trace", "/reset", "Second?", "/nope", "/exit", "Never?"])
    assert "no turn yet" in out
    assert "layer 1:" in out and "layer 2:" in out and "smollm2 (smollm2-135m-instruct" in out and "gemma3 (gemma3-270m" in out
    assert "[gemma3-270m]" in out, "the trace shows each proposer's answer"
    last = moa.runner.engines["smollm2-135m-instruct"].streams[-1]  # type: ignore[attr-defined]
    assert [m["content"] for m in last.messages if m["role"] == "user"] == ["Second?"], "/reset forgot the first turn"
    assert "conversation cleared" in err and "unknown command /nope" in err
    assert "Never?" not in out, "/exit stops reading"


def test_a_failed_turn_is_reported_and_dropped_from_history(fake_recipe: Recipe) -> None:
    out, err, moa = chat(fake_recipe, ["boom now", "fine?"], fail_if_contains="boom")
    assert "error:" in err and "only 0 of 2 proposers answered" in err
    last = moa.runner.engines["smollm2-135m-instruct"].streams[-1]  # type: ignore[attr-defined]
    assert [m["content"] for m in last.messages if m["role"] == "user"] == ["fine?"]
    assert "fine?" in out


def test_chunked_recipe_streams_and_keeps_the_trace(fake_recipe: Recipe) -> None:
    recipe = fake_recipe.model_copy(update={"aggregation": "chunked", "chunk_tokens": 2})
    out, err, moa = chat(recipe, ["Why is the sky blue?", "/trace"], token_delay_s=0.001)
    assert "synthesized 2 references" in out.splitlines()[0]
    assert "layer 2:" in out and "FAILED" not in out
    assert "chunked aggregation, 2-token chunks" in err


def test_cli_chat_runs_as_a_subprocess() -> None:
    r = subprocess.run(
        [sys.executable, "-c", "from moa_local.cli import main; main()", "chat", "-r", "fake", "--aggregation", "chunked"],
        input="Is water wet?\n/trace\n/exit\n", capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "Is water wet?" in r.stdout and "layer 2:" in r.stdout
