"""The HumanEval sandbox's own behaviour: the value codec at its boundary, verdicts that do not depend on anything the
code controls, readable failure details, its settings, and every canonical HumanEval solution still passing.
(The attacks are in test_sandbox_hostile.py.)"""

from __future__ import annotations

import contextlib
import math
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from moa_local.errors import ConfigError
from moa_local.eval import get_suite, sandbox
from moa_local.eval.humaneval import build_check
from moa_local.eval.sandbox import Check, SandboxConfig, run_check, run_checks
from moa_local.eval.sandbox_jail import CodecError, decode, encode

TEST = "def check(candidate):\n    assert candidate(2, 3) == 5\n"
PROJECT = Path(__file__).resolve().parents[2]


def _add(body: str) -> Check:
    return Check(source=f"def add(a, b):\n{body}\n", entry_point="add", test=TEST)


def test_plain_values_cross_the_boundary_unchanged_and_keep_their_types() -> None:
    values = [None, True, 0, -(10**40), 1.5, -0.0, "é\n", [1, [2]], (1, (2,)), {1: "a", (1, 2): [3]}, {1, 2},
              frozenset({"x"}), b"\x00\xff", 1 + 2j, [], (), {}, set()]
    for value in values:
        back = decode(encode(value))
        assert back == value and type(back) is type(value), value
    assert math.isnan(decode(encode(float("nan")))) and decode(encode(float("inf"))) == float("inf")
    assert type(decode(encode(True))) is bool and type(decode(encode(1))) is int


def test_objects_with_their_own_equality_cannot_cross() -> None:
    class Sneaky(int):
        def __eq__(self, other: object) -> bool:
            return True

        __hash__ = int.__hash__

    for value in (Sneaky(1), [Sneaky(1)], {"k": Sneaky(1)}, object(), iter([1])):
        with pytest.raises(CodecError):
            encode(value)
    deep: list[object] = []
    for _ in range(200):
        deep = [deep]
    with pytest.raises(CodecError, match="deeper"):
        encode(deep)
    for forged in ({"object": 1}, {"tuple": 1}, {"set": [[1]]}, {"dict": [[[1], 2]]}, {"a": 1, "b": 2}):
        with pytest.raises(CodecError):
            decode(forged)


def test_the_verdict_comes_from_the_test_not_from_the_programs_output_or_exit() -> None:
    forged = _add("    import os\n    print('passed')\n    os._exit(0)")
    deleted_output = _add("    import contextlib, os\n    with contextlib.suppress(OSError):\n"
                          "        os.unlink(os.readlink('/proc/self/fd/1'))\n    os.close(1)\n    return a + b")
    right, wrong, raises = _add("    return a + b"), _add("    return a - b"), _add("    return 1 / 0")
    outcomes = run_checks([forged, deleted_output, right, wrong, raises], workers=2)
    assert [o.passed for o in outcomes] == [False, True, True, False, False], outcomes
    assert "ended without answering" in outcomes[0].detail
    assert outcomes[3].detail == "AssertionError at `assert candidate(2, 3) == 5`"
    assert outcomes[4].detail == "the function raised ZeroDivisionError: division by zero"


def test_a_module_that_fails_to_load_is_a_failed_item_with_the_reason() -> None:
    broken = run_check(Check(source="def add(a, b)\n    return a + b\n", entry_point="add", test=TEST))
    assert broken.status == "failed" and broken.detail.startswith("the program raised SyntaxError")
    missing = run_check(Check(source="x = 1\n", entry_point="add", test=TEST))
    assert missing.status == "failed" and "KeyError" in missing.detail
    exits = run_check(Check(source="import sys\nsys.exit(0)\n", entry_point="add", test=TEST))
    assert exits.status == "failed" and "SystemExit" in exits.detail


def test_tests_that_call_the_function_by_name_and_use_prompt_helpers_get_the_jailed_one() -> None:
    setup = "def helper(x):\n    return x * 10\n\ndef f(x):\n    '''doc'''\n"
    test = "def check(candidate):\n    assert f(1) == candidate(1) == helper(1) + 1\n"
    assert run_check(Check(source=setup + "    return helper(x) + 1\n", entry_point="f", test=test, setup=setup)).passed
    assert not run_check(Check(source=setup + "    return 0\n", entry_point="f", test=test, setup=setup)).passed


def test_settings_are_closed_and_the_isolation_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="extra"):
        SandboxConfig(timeout=3)  # type: ignore[call-arg]
    monkeypatch.setenv("MOA_LOCAL_SANDBOX", "rlimits")
    assert SandboxConfig().isolation == "rlimits"
    monkeypatch.setenv("MOA_LOCAL_SANDBOX", "docker")
    with pytest.raises(ConfigError, match="MOA_LOCAL_SANDBOX must be auto, bubblewrap or rlimits, got 'docker'"):
        SandboxConfig()


def test_asking_for_bubblewrap_where_it_is_missing_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    sandbox.probe.cache_clear()
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None)
    try:
        with pytest.raises(ConfigError, match="bwrap not found.*apt-get install bubblewrap"):
            sandbox.probe("bubblewrap")
        fallback = sandbox.probe("auto")
        assert fallback.mode == "rlimits" and fallback.fallback_reason == "bwrap not found"
        notice = fallback.notice()
        assert notice is not None and "\n" not in notice and "network" in notice and "install bubblewrap" in notice
    finally:
        sandbox.probe.cache_clear()


def test_every_canonical_humaneval_solution_passes() -> None:
    items = get_suite("humaneval").items()
    checks = [build_check(it.data, it.data["prompt"] + it.data["canonical_solution"]) for it in items]
    start = time.monotonic()
    outcomes = run_checks(checks, config=SandboxConfig(timeout_s=30), workers=2)  # slack for a loaded machine
    failed = [(it.id, o.detail) for it, o in zip(items, outcomes, strict=True) if not o.passed]
    assert len(items) == 164 and not failed, failed
    assert time.monotonic() - start < 120


SLEEPER = """
import os, time
if os.fork() == 0:
    os.setsid()
    os.execv("/bin/sleep", ["sleep", "{seconds}"])
time.sleep(60)
def add(a, b):
    return a + b
"""


def _sleepers(seconds: str) -> list[int]:
    found = []
    for pid in os.listdir("/proc"):
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/cmdline").read_bytes() == f"sleep\0{seconds}\0".encode():
                found.append(int(pid))
    return found


def _wait_until(condition: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


@pytest.mark.parametrize("isolation", ["bubblewrap", "rlimits"])
def test_the_jail_dies_with_the_evaluator(isolation: str) -> None:
    """SIGKILL the evaluator mid-check: its supervisors die with it (parent-death signal) and, with bubblewrap, so
    does the whole jail (its PID namespace). In the fallback a process that left the jail's first process survives
    until the next supervisor takes its uid (root), which kills everything that uid runs."""
    try:
        machine = sandbox.probe(isolation)
    except ConfigError as exc:
        pytest.skip(str(exc))
    if machine.mode == "rlimits" and not machine.as_root:
        pytest.skip("the fallback as a non-root user cannot kill what outlives a killed evaluator")
    seconds = f"{4000 + secrets.randbelow(1000)}.{secrets.randbelow(10**6):06d}"
    script = ("from moa_local.eval.sandbox import Check, SandboxConfig, run_check\n"
              f"run_check(Check(source={SLEEPER.format(seconds=seconds)!r}, entry_point='add', test='', setup=''),"
              f" config=SandboxConfig(isolation={isolation!r}, timeout_s=60))\n")
    evaluator = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": os.pathsep.join([str(PROJECT), os.environ.get("PYTHONPATH", "")])},
                                 stderr=subprocess.DEVNULL)
    try:
        assert _wait_until(lambda: bool(_sleepers(seconds)), 30), "the jail never started its sleeper"
        evaluator.kill()
        evaluator.wait()
        if machine.mode == "rlimits":
            run_check(_add("    return a + b"), config=SandboxConfig(isolation="rlimits"))
        assert _wait_until(lambda: not _sleepers(seconds)), "a jailed process outlived the evaluator"
    finally:
        evaluator.kill()
        for pid in _sleepers(seconds):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
