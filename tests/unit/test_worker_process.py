"""The worker process machinery (engines/worker.py) with the echo host: handshake, calls, streams, start failures,
death mid-call, shutdown of the whole process group, and workers dying with their parent. No model, no vLLM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from moa_local.engines.worker import WorkerProcess, WorkerSpec, group_pids, pid_alive
from moa_local.errors import EngineDiedError, EngineStartError

ECHO = "moa_local.engines.echo:EchoHost"



def _wait_gone(pids: list[int], timeout: float = 5.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(pid_alive(p) for p in pids):
        time.sleep(0.05)
    return [p for p in pids if pid_alive(p)]


@pytest.fixture
def echo(tmp_path: Path):  # type: ignore[no-untyped-def]
    spec = WorkerSpec(name="echo", host=ECHO, host_args={"delay_s": 0.05}, env={"MOA_TEST_ENV": "set-before-host"},
                      log_path=str(tmp_path / "echo.log"))
    worker = WorkerProcess(spec, start_timeout_s=30)
    yield worker
    worker.close(grace_s=2)


def test_handshake_calls_and_streams(echo: WorkerProcess) -> None:
    assert echo.info["pgid"] == echo.info["pid"] == echo.pid  # the worker leads its own process group
    assert echo.info["env"]["MOA_TEST_ENV"] == "set-before-host"
    assert echo.is_alive()
    assert echo.call("generate", ["a", "b"]) == ["A", "B"]
    assert list(echo.stream_call("stream", "one two")) == [("delta", "one"), ("delta", "two"), ("result", None)]


def test_concurrent_calls_each_get_their_own_answer(echo: WorkerProcess) -> None:
    out: dict[int, list[str]] = {}
    threads = [threading.Thread(target=lambda i=i: out.__setitem__(i, echo.call("generate", [f"x{i}"]))) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert out == {i: [f"X{i}"] for i in range(8)}


def test_close_ends_the_whole_process_group(echo: WorkerProcess) -> None:
    grandchild = echo.call("spawn_child", None)  # stands for vLLM's EngineCore
    assert set(echo.pids()) == {echo.pid, grandchild}
    echo.close(grace_s=2)
    assert _wait_gone([echo.pid, grandchild]) == []
    assert not echo.is_alive()
    with pytest.raises(EngineDiedError, match="is closed"):
        echo.call("generate", ["late"])


def test_worker_killed_mid_call_fails_the_call_quickly_and_reaps_its_children(tmp_path: Path) -> None:
    spec = WorkerSpec(name="slow", host=ECHO, host_args={"delay_s": 30}, log_path=str(tmp_path / "slow.log"))
    worker = WorkerProcess(spec, start_timeout_s=30)
    try:
        grandchild = worker.call("spawn_child", None)
        threading.Timer(0.3, os.kill, (worker.pid, signal.SIGKILL)).start()
        start = time.monotonic()
        with pytest.raises(EngineDiedError, match="died"):
            worker.call("generate", ["never answered"])
        assert time.monotonic() - start < 3.0  # bounded by the reader's poll, not by the 30 s call
        assert not worker.is_alive()
        assert _wait_gone([grandchild]) == []  # the orphaned "EngineCore" goes too
    finally:
        worker.close(grace_s=1)


def test_start_failure_carries_the_log_tail(tmp_path: Path) -> None:
    spec = WorkerSpec(name="bad", host=ECHO, host_args={"fail_start": True}, log_path=str(tmp_path / "bad.log"))
    with pytest.raises(EngineStartError) as err:
        WorkerProcess(spec, start_timeout_s=30)
    assert "refusing to start as asked" in str(err.value) and "RuntimeError: asked to fail" in str(err.value)


def test_start_timeout_kills_the_worker(tmp_path: Path) -> None:
    spec = WorkerSpec(name="sleepy", host=ECHO, host_args={"start_delay_s": 60}, log_path=str(tmp_path / "s.log"))
    start = time.monotonic()
    with pytest.raises(EngineStartError, match="did not start within 1 s"):
        WorkerProcess(spec, start_timeout_s=1)
    assert time.monotonic() - start < 8


_PARENT = """
import json, sys, time
from moa_local.engines.worker import WorkerProcess, WorkerSpec
if __name__ == "__main__":
    w = WorkerProcess(WorkerSpec(name="orphan", host="moa_local.engines.echo:EchoHost", log_path=sys.argv[1]),
                      start_timeout_s=30)
    print(json.dumps([w.pid, w.call("spawn_child", None)]), flush=True)
    time.sleep(600)
"""


def test_workers_die_with_their_parent_even_on_sigkill(tmp_path: Path) -> None:
    parent = subprocess.Popen([sys.executable, "-c", _PARENT, str(tmp_path / "o.log")], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        worker, grandchild = json.loads(parent.stdout.readline())
        assert pid_alive(worker) and pid_alive(grandchild)
        parent.kill()  # no atexit, no finally: only the worker's parent watch can clean up
        parent.wait(5)
        assert _wait_gone([worker, grandchild]) == []
    finally:
        parent.kill()
    assert group_pids(worker) == []
