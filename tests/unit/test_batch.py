"""Batch jobs: input validation before anything loads, append-only output, resume after SIGKILL."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moa_local.api import load
from moa_local.batch import finished_ids, prepare_batch, read_input, run_batch
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
    src = _jsonl(tmp_path / "in.jsonl", [{"id": i, "prompt": f"q{i}"} for i in range(5)])
    first_src = _jsonl(tmp_path / "first.jsonl", [{"id": i, "prompt": f"q{i}"} for i in range(3)])
    out = tmp_path / "out.jsonl"
    with load("fake") as moa:
        job = prepare_batch(first_src, out)
        first = run_batch(moa, job)
        job.close()
        job = prepare_batch(src, out)
        second = run_batch(moa, job)
        job.close()
    assert (first.total, first.skipped, first.ok, first.failed) == (3, 0, 3, 0)
    assert (second.total, second.skipped, second.ok, second.failed) == (5, 3, 2, 0)
    assert second.generated_tokens > 0 and second.schedule == "flow"
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert sorted(x["id"] for x in lines) == ["0", "1", "2", "3", "4"]
    assert set(lines[0]) == {"id", "output", "recipe", "error", "usage", "seconds"}


@pytest.mark.parametrize("schedule", ["flow", "stage"])
def test_the_input_is_read_as_the_window_frees_up(tmp_path: Path, schedule: str) -> None:
    """Streamed: at most ``window`` conversations are read ahead of the ones finished."""
    src = _jsonl(tmp_path / "in.jsonl", [{"id": i, "prompt": f"q{i}"} for i in range(40)])
    out = tmp_path / "out.jsonl"
    import moa_local.batch.runner as runner_module

    read = [0]
    original = runner_module.iter_input

    def counting(path: Path):  # type: ignore[no-untyped-def]
        for record in original(path):
            read[0] += 1
            yield record

    written: list[int] = []
    runner_module.iter_input = counting  # type: ignore[assignment]
    try:
        with load("fake", schedule=schedule, window=4) as moa:  # type: ignore[arg-type]
            job = prepare_batch(src, out)
            summary = run_batch(moa, job, on_progress=lambda done, total: written.append(read[0] - done))
            job.close()
    finally:
        runner_module.iter_input = original  # type: ignore[assignment]
    assert summary.ok == 40
    if schedule == "flow":
        assert max(written) <= 4, "never more than the window read ahead of what is written"
    else:
        assert len(summary.steps) == 3 and read[0] == 3 * 40, "one pass over the input per step"


def test_stage_job_journal_is_removed_when_complete_or_kept_when_asked(tmp_path: Path) -> None:
    src = _jsonl(tmp_path / "in.jsonl", [{"id": i, "prompt": f"q{i}"} for i in range(6)])
    with load("fake", schedule="stage") as moa:
        job = prepare_batch(src, tmp_path / "a.jsonl")
        done = run_batch(moa, job)
        job.close()
        job = prepare_batch(src, tmp_path / "b.jsonl")
        kept = run_batch(moa, job, keep_journal=True)
        job.close()
    assert done.ok == kept.ok == 6 and done.schedule == "stage"
    assert not (tmp_path / "a.jsonl.journal").exists() and done.journal is None
    assert (tmp_path / "b.jsonl.journal").exists() and kept.journal == str(tmp_path / "b.jsonl.journal")


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
    args = _cli("run", "--recipe", str(recipe), "--input", str(src), "--output", str(out), "--window", "2")
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
    assert f"{done_before} skipped" in final.stderr


def test_stage_job_killed_mid_step_resumes_without_regenerating_a_journaled_response(tmp_path: Path) -> None:
    import sqlite3

    recipe = tmp_path / "slow.yaml"
    recipe.write_text(SLOW_RECIPE)
    n = 30
    src = _jsonl(tmp_path / "in.jsonl", [{"id": f"q{i}", "prompt": f"question {i}"} for i in range(n)])
    out, summary = tmp_path / "out.jsonl", tmp_path / "summary.json"
    journal = tmp_path / "out.jsonl.journal"
    args = _cli("run", "--recipe", str(recipe), "--input", str(src), "--output", str(out), "--schedule", "stage",
                "--window", "3", "--summary-json", str(summary))
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    rows = 0
    while proc.poll() is None and time.monotonic() < deadline:  # kill in layer 2: layer-1 rows are all in
        if journal.exists():
            with contextlib.closing(sqlite3.connect(journal)) as db, contextlib.suppress(sqlite3.Error):
                rows = db.execute("SELECT COUNT(*) FROM responses WHERE layer = 2").fetchone()[0]
            if rows >= 5:
                break
        time.sleep(0.02)
    assert proc.poll() is None, "the job finished before it could be killed; slow it down"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists() or out.read_text() == "", "stage schedule: nothing is answered before the last step"
    with contextlib.closing(sqlite3.connect(journal)) as db:
        kept = db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]
    assert kept >= 2 * n + 5
    final = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert final.returncode == 0, final.stderr
    ids = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    assert sorted(ids) == sorted(f"q{i}" for i in range(n))
    sent = sum(step["requests"] for step in json.loads(summary.read_text())["steps"])
    assert sent == n * 5 - kept, "every journaled response was reused, every other one generated once"
    assert not journal.exists(), "the journal goes away when the job completes"
