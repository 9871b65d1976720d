"""Hostile input at the command line: every failure is one line with a non-zero exit, before any engine loads, and
no file that is not a results file of this tool is ever modified. Fake backend."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moa_local import cli

ENGINES_STARTED: list[str] = []


@pytest.fixture(autouse=True)
def _count_engine_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    import moa_local.engines as engines

    real = engines.create_engine
    ENGINES_STARTED.clear()

    def counting(config, **kwargs):  # type: ignore[no-untyped-def]
        ENGINES_STARTED.append(config.id)
        return real(config, **kwargs)

    monkeypatch.setattr(engines, "create_engine", counting)


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    old = sys.argv
    sys.argv = ["moa-local", *args]
    try:
        cli.main()
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    finally:
        sys.argv = old
    err = capsys.readouterr().err
    return code, err


def one_line_error(code: int, err: str, *, expect: str = "") -> None:
    assert code != 0, err
    assert "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if line.strip() and not line.startswith("starting engine")]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert expect.lower() in lines[0].lower(), err


@pytest.mark.parametrize(("args", "expect"), [
    (["run", "--bogus-flag", "hi"], "no such option"),
    (["serve", "--port", "notanumber"], "--port"),
    (["eval", "-r", "fake"], "--suite"),
    (["no-such-command"], "no-such-command"),
    (["run", "-r", "fake", "--backend", "bogus", "hi"], "unknown backend 'bogus'"),
    (["run", "-r", "fake", "--window", "0", "hi"], "window"),
    (["run", "-r", "fake", "--schedule", "sideways", "hi"], "--schedule"),
    (["eval", "-s", "math", "-r", "fake", "--chunk-size", "0"], "chunk-size"),
    (["plan", "--gpus", "99999999999xH100-80GB"], "1 to 64"),
    (["plan", "--nodes", "99999999x8xH100-80GB"], "nodes"),
    (["plan", "--cpu-memory", "lots"], "memory size 'lots'"),
    (["run", "-r", "fake", ""], "empty"),
    (["run", "-r", "no-such-recipe", "hi"], "unknown recipe"),
    (["run", "-r", "fake", "--temperature", "9", "hi"], "temperature"),
    (["serve", "-r", "fake", "--api-key", ""], "blank api key"),
    (["serve", "-r", "fake", "--api-key", " spaced "], "printable ascii"),
    (["models", "prepare", "../../etc/passwd"], "model"),
])
def test_usage_errors_are_one_line(capsys: pytest.CaptureFixture[str], args: list[str], expect: str) -> None:
    code, err = run(capsys, *args)
    one_line_error(code, err, expect=expect)
    assert not ENGINES_STARTED


def test_no_arguments_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    old = sys.argv
    sys.argv = ["moa-local"]
    try:
        with pytest.raises(SystemExit) as exc:
            cli.main()
    finally:
        sys.argv = old
    captured = capsys.readouterr()
    assert exc.value.code == 2 and "Traceback" not in captured.err and "Usage" in captured.out + captured.err


def test_a_deep_yaml_recipe_is_an_error_not_a_recursion(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    deep = tmp_path / "deep.yaml"
    deep.write_text("a: " + "[" * 20000 + "]" * 20000 + "\n")
    code, err = run(capsys, "run", "-r", str(deep), "hi")
    one_line_error(code, err, expect="deep")


def _jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


BAD_INPUTS: list[tuple[str, bytes, str]] = [
    ("binary", b"\x00\x01\xff\xfe\x80binary\n", "not utf-8"),
    ("utf16", '{"id": 1, "prompt": "hi"}\n'.encode("utf-16"), "not utf-8"),
    ("deep", b'{"id": 1, "prompt": ' + b"[" * 100000 + b"]" * 100000 + b"}\n", "deep"),
    ("surrogate", b'{"id": 1, "prompt": "a\\ud800b"}\n', "surrogate"),
    ("not json", b"{not json\n", "not valid json"),
    ("array", b"[1, 2]\n", "json object"),
    ("no prompt", b'{"id": 1}\n', "needs exactly one"),
    ("empty prompt", b'{"id": 1, "prompt": "   "}\n', "non-empty"),
    ("bad role", b'{"id": 1, "messages": [{"role": "bot", "content": "x"}]}\n', "role"),
    ("duplicate", b'{"id": 1, "prompt": "a"}\n{"id": 1, "prompt": "b"}\n', "duplicate id"),
    ("bool id", b'{"id": true, "prompt": "a"}\n', "'id'"),
    ("empty file", b"\n\n", "no records"),
    ("huge id", b'{"id": "", "prompt": "a"}\n', "'id' is empty"),
]


@pytest.mark.parametrize(("name", "data", "expect"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_batch_input_is_one_line_before_any_engine(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                       name: str, data: bytes, expect: str) -> None:
    src = tmp_path / "in.jsonl"
    src.write_bytes(data if name == "empty file" else b'{"id": "ok", "prompt": "fine"}\n' + data)
    out = tmp_path / "out.jsonl"
    code, err = run(capsys, "run", "-r", "fake", "--input", str(src), "--output", str(out))
    one_line_error(code, err, expect=expect)
    assert not ENGINES_STARTED and not out.exists(), "nothing loaded, nothing written"


def test_bad_output_paths_are_refused_before_any_engine(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    src = _jsonl(tmp_path / "in.jsonl", [{"id": 1, "prompt": "hi"}])
    a_file = _jsonl(tmp_path / "file.txt", ["not a folder"])
    cases = {
        str(tmp_path): "is a folder",
        str(a_file / "out.jsonl"): "cannot create its folder",
        "/dev/full": "not a regular file",
        str(src): "is the input file",
    }
    for out, expect in cases.items():
        code, err = run(capsys, "run", "-r", "fake", "--input", str(src), "--output", out)
        one_line_error(code, err, expect=expect)
    code, err = run(capsys, "run", "-r", "fake", "--input", str(src), "--output", str(tmp_path / "o.jsonl"),
                    "--summary-json", str(tmp_path))
    one_line_error(code, err, expect="summary-json")
    assert not ENGINES_STARTED


@pytest.mark.skipif(os.geteuid() != 0 or not Path("/usr/bin/chattr").exists(), reason="needs root and chattr")
def test_an_immutable_output_is_refused(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    src = _jsonl(tmp_path / "in.jsonl", [{"id": 1, "prompt": "hi"}])
    out = tmp_path / "out.jsonl"
    out.write_text("")
    if subprocess.run(["chattr", "+i", str(out)], capture_output=True).returncode != 0:
        pytest.skip("this filesystem has no immutable flag")
    try:
        code, err = run(capsys, "run", "-r", "fake", "--input", str(src), "--output", str(out))
        one_line_error(code, err, expect="not writable")
    finally:
        subprocess.run(["chattr", "-i", str(out)], check=False)


def test_an_existing_file_that_is_not_a_results_file_is_left_untouched(capsys: pytest.CaptureFixture[str],
                                                                       tmp_path: Path) -> None:
    src = _jsonl(tmp_path / "in.jsonl", [{"id": 1, "prompt": "hi"}])
    for content in ("my notes\nsecond line without newline", '{"id": 1, "output": "x"}\nnot a record\n',
                    '{"name": "other tool"}\n{"half": '):
        out = tmp_path / "precious.txt"
        out.write_text(content)
        code, err = run(capsys, "run", "-r", "fake", "--input", str(src), "--output", str(out))
        one_line_error(code, err, expect="not a results file")
        assert out.read_text() == content, "not a byte changed"
    trace = tmp_path / "notes.json"
    trace.write_text('{"my": "data"}')
    code, err = run(capsys, "run", "-r", "fake", "--trace", str(trace), "hi")
    one_line_error(code, err, expect="not a trace")
    assert trace.read_text() == '{"my": "data"}'
    code, err = run(capsys, "run", "-r", "fake", "--trace", str(tmp_path / "missing" / "deeper" / "t.json"), "hi")
    assert code == 0 and (tmp_path / "missing" / "deeper" / "t.json").is_file(), err


def test_a_results_file_is_resumed_and_its_torn_line_cut(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    src = _jsonl(tmp_path / "in.jsonl", [{"id": i, "prompt": f"q{i}"} for i in range(3)])
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": "0", "output": "x", "recipe": "fake", "error": null}\n{"id": "1", "outp')
    code, err = run(capsys, "run", "-r", "fake", "--input", str(src), "--output", str(out))
    assert code == 0, err
    ids = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    assert sorted(ids) == ["0", "1", "2"] and "1 skipped" in err
