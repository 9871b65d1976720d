"""The CLI as a user meets it: real subprocesses, fake backend."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from moa_local.cli import main; main()", *args],
        capture_output=True, text=True, timeout=120, cwd=cwd,
    )


def test_run_one_prompt_prints_answer_summary_and_trace(tmp_path: Path) -> None:
    trace = tmp_path / "t.json"
    r = cli("run", "--recipe", "fake", "--trace", str(trace), "Is water wet?")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().startswith("[smollm2-135m-instruct]") and "Is water wet?" in r.stdout
    assert "per-layer summary" in r.stderr and "gemma3" in r.stderr
    t = json.loads(trace.read_text())
    assert len(t["layers"]) == 2 and t["aggregator"]["model"] == "smollm2-135m-instruct"
    assert {"model", "text", "error", "usage", "seconds"} <= set(t["layers"][0]["responses"][0])


def test_batch_with_trace_and_overrides(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text('{"id": 1, "prompt": "a b c d e f g"}\n{"id": 2, "instruction": "x"}\n')
    out = tmp_path / "out.jsonl"
    r = cli("run", "-r", "fake", "-i", str(src), "-o", str(out), "--trace", "-", "--max-tokens", "3")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["id"] for x in rows] == ["1", "2"] and all("trace" in x for x in rows)
    assert all(len(x["output"].split()) <= 3 for x in rows)
    assert "2 ok, 0 failed" in r.stderr


def test_errors_are_one_line_with_a_fix_and_nonzero_exit(tmp_path: Path) -> None:
    r = cli("run", "--recipe", "nope", "hi")
    assert r.returncode == 2
    assert "unknown recipe 'nope'" in r.stderr and "Traceback" not in r.stderr
    bad = tmp_path / "in.jsonl"
    bad.write_text('{"id": 1, "prompt": "ok"}\n{"id": 2}\n')
    r = cli("run", "-r", "fake", "-i", str(bad), "-o", str(tmp_path / "o.jsonl"))
    assert r.returncode == 2 and "line 2" in r.stderr and not (tmp_path / "o.jsonl").exists()
    r = cli("--debug", "run", "--recipe", "nope", "hi")
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_usage_errors() -> None:
    r = cli("run", "--recipe", "fake")
    assert r.returncode == 2 and "PROMPT or --input" in r.stderr
    r = cli("run", "--recipe", "fake", "--temperature", "9", "x")
    assert r.returncode == 2 and "temperature" in r.stderr


def test_recipes_and_models_commands() -> None:
    r = cli("recipes", "list")
    assert r.returncode == 0 and "tiny" in r.stdout and "moa-lite" in r.stdout
    r = cli("recipes", "show", "tiny")
    assert r.returncode == 0 and "gemma3-270m" in r.stdout and "layers: 2" in r.stdout
    r = cli("models", "list")
    assert r.returncode == 0 and "smollm2-135m-instruct" in r.stdout
