"""`moa-local eval` on the fake backend: every suite with --limit 3 leaves results.jsonl, report.md and scores.png;
engines start once per run; usage errors are one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from moa_local.cli import app

SYSTEMS = {"moa", "proposer:smollm2", "proposer:gemma3", "aggregator:smollm2-135m-instruct"}


@pytest.mark.parametrize("suite", ["ifeval", "humaneval", "mtbench", "alpacaeval", "math"])
def test_each_suite_runs_end_to_end_on_the_fake_backend(suite: str, tmp_path: Path) -> None:
    out = tmp_path / suite
    args = ["eval", "--suite", suite, "--recipe", "fake", "--limit", "3", "--output", str(out)]
    if suite in ("mtbench", "alpacaeval"):
        args += ["--judge", "smollm2-135m-instruct"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    systems = {r["system"] for r in rows}
    assert systems >= SYSTEMS and any(s.startswith("self-moa:") for s in systems)
    assert len(rows) == 15 and {r["suite"] for r in rows} == {suite}
    assert all(r["usage"]["completion_tokens"] > 0 for r in rows)
    md = (out / "report.md").read_text()
    assert md.startswith(f"# {suite}: recipe `fake`")
    assert "| system | model | score | 95% CI |" in md and "## Paired differences" in md
    assert all(f"| {s} |" in md or f"| **{s}** |" in md for s in SYSTEMS)
    assert "MoA − best single model" in md and "![scores](scores.png)" in md
    assert (out / "scores.png").read_bytes()[:4] == b"\x89PNG"
    info = json.loads((out / "run.json").read_text())
    assert info["backend"] == "fake" and info["items"] == 3 and "CPU memory" in info["machine"]
    assert f"machine: {info['machine']}" in md


def _main(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """Run the real entry point in-process (its error handling included); returns (exit code, stderr)."""
    import moa_local.cli as cli

    old = sys.argv
    sys.argv = ["moa-local", *args]
    try:
        cli.main()
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    finally:
        sys.argv = old
    return code, capsys.readouterr().err


def test_engines_start_once_and_report_only_rebuilds(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import moa_local.engines as engines_module

    started: list[str] = []
    real = engines_module.create_engine

    def counting(config, **kwargs):  # type: ignore[no-untyped-def]
        started.append(config.id)
        return real(config, **kwargs)

    monkeypatch.setattr(engines_module, "create_engine", counting)
    out = tmp_path / "m"
    code, err = _main(capsys, "eval", "-s", "math", "-r", "fake", "--limit", "2", "-o", str(out),
                      "--baselines", "proposers,self-moa")
    assert code == 0, err
    assert sorted(started) == ["gemma3-270m", "smollm2-135m-instruct"], "each engine starts once for all systems"
    assert "aggregator:" not in (out / "report.md").read_text()
    (out / "report.md").unlink()
    (out / "scores.png").unlink()
    again = CliRunner().invoke(app, ["eval", "-s", "math", "-r", "fake", "-o", str(out), "--report-only"])
    assert again.exit_code == 0 and (out / "report.md").is_file() and (out / "scores.png").is_file()


def test_usage_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _main(capsys, "eval", "-s", "mtbench", "-r", "fake", "--limit", "1", "-o", str(tmp_path / "a"))
    assert code == 2 and "--judge" in err and "Traceback" not in err
    code, err = _main(capsys, "eval", "-s", "mmlu", "-r", "fake")
    assert code == 2 and "unknown suite 'mmlu'" in err
    code, err = _main(capsys, "eval", "-s", "math", "-r", "fake", "--baselines", "oracle", "-o", str(tmp_path / "b"))
    assert code == 2 and "unknown baseline" in err
    code, err = _main(capsys, "eval", "-s", "math", "-r", "fake", "--report-only", "-o", str(tmp_path / "empty"))
    assert code == 2 and "no results in" in err


def test_a_subprocess_run_prints_errors_as_one_line(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-c", "from moa_local.cli import main; main()", "eval", "-s", "math", "-r",
                        "fake", "--temperature", "9", "-o", str(tmp_path / "x")], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "temperature" in r.stderr
