"""Batch jobs: input validation before anything loads, append-only output, resume after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moa_local.api import load
from moa_local.batch import finished_ids, read_input, run_batch
from moa_local.batch.jsonl import ResultWriter
from moa_local.errors import InputError


def _jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_input_forms(tmp_path: Path) -> None:
    recs = read_input(
        _jsonl(
            tmp_path / "in.jsonl",
            [
                {"id": "a", "prompt": "p"},
                {"id": 2, "messages": [{"role": "user", "content": "m"}]},
                {"instruction": "alpaca style"},
            ],
        )
    )
    assert [r.id for r in recs] == ["a", "2", "3"]
    assert recs[2].messages == [{"role": "user", "content": "alpaca style"}]


@pytest.mark.parametrize(
    ("row", "match"),
    [
        ("{not json", "line 2: not valid JSON"),
        ({"id": "x"}, "line 2: needs exactly one of"),
        ({"id": "x", "prompt": "a", "instruction": "b"}, "line 2: needs exactly one of"),
        ({"id": "ok", "prompt": ""}, "line 2: 'prompt' must be a non-empty string"),
        ({"id": "m", "messages": [{"role": "bot", "content": "x"}]}, r"line 2: messages\[0\]\.role"),
        ({"id": "first", "prompt": "dup"}, "line 2: duplicate id 'first' \\(first on line 1\\)"),
        ([1, 2], "line 2: expected a JSON object"),
    ],
)
def test_bad_lines_name_their_line(tmp_path: Path, row: object, match: str) -> None:
    path = _jsonl(tmp_path / "in.jsonl", [{"id": "first", "prompt": "ok"}, row])
    with pytest.raises(InputError, match=match):
        read_input(path)


def test_torn_tail_is_cut_and_finished_ids_read(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": "a", "output": "x"}\n{"id": "b", "outp')
    assert finished_ids(out) == {"a"}
    assert out.read_text() == '{"id": "a", "output": "x"}\n'
    with ResultWriter(out) as w:
        w.write({"id": "c"})
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["a", "c"]


def test_run_batch_skips_done_ids(tmp_path: Path) -> None:
    records = read_input(_jsonl(tmp_path / "in.jsonl", [{"id": i, "prompt": f"q{i}"} for i in range(5)]))
    out = tmp_path / "out.jsonl"
    with load("fake") as moa:
        first = run_batch(moa, records[:3], out, chunk_size=2)
        second = run_batch(moa, records, out, chunk_size=2)
    assert first == {"total": 3, "skipped": 0, "ok": 3, "failed": 0}
    assert second == {"total": 5, "skipped": 3, "ok": 2, "failed": 0}
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert sorted(x["id"] for x in lines) == ["0", "1", "2", "3", "4"]
    assert set(lines[0]) == {"id", "output", "recipe", "error", "usage", "seconds"}


SLOW_RECIPE = """
name: fake-slow
backend: fake
layers: 2
proposers:
  - {model: smollm2-135m-instruct, name: a}
  - {model: gemma3-270m, name: b}
aggregator: {model: smollm2-135m-instruct, name: agg}
engines:
  smollm2-135m-instruct: {fake: {latency_s: 0.03}}
  gemma3-270m: {fake: {latency_s: 0.03}}
"""


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "from moa_local.cli import main; main()", *args]


def test_sigkill_at_any_point_then_resume_gives_every_id_once(tmp_path: Path) -> None:
    recipe = tmp_path / "slow.yaml"
    recipe.write_text(SLOW_RECIPE)
    n = 40
    src = _jsonl(tmp_path / "in.jsonl", [{"id": f"q{i}", "prompt": f"question {i}"} for i in range(n)])
    out = tmp_path / "out.jsonl"
    args = _cli("run", "--recipe", str(recipe), "--input", str(src), "--output", str(out), "--chunk-size", "1")
    kills = 0
    for target in (2, 6, 11):  # kill once the output holds `target` lines: mid-chunk, at arbitrary points
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            if out.exists() and out.read_bytes().count(b"\n") >= target:
                break
            time.sleep(0.01)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
    assert kills == 3, "the job finished before it could be killed; slow it down"
    done_before = len(finished_ids(out))
    assert 0 < done_before < n
    final = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert final.returncode == 0, final.stderr
    ids = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    assert sorted(ids) == sorted(f"q{i}" for i in range(n)), "every id exactly once"
    assert f"{done_before} already in" in final.stderr
