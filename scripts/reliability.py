"""Reliability counts: every hostile input the test suites throw at moa-local, tried and handled cleanly.

    .venv/bin/python scripts/reliability.py            # runs the hostile suites (fake backend; ~2 min)

Runs the hostile test modules with pytest (JUnit XML) and counts their cases per area: CLI usage errors, batch
inputs, output paths, server bodies and connections, fuzzed recipes/JSONL/bodies, and the sandbox's hostile
programs. A case passes only when the input was handled the way its test demands (one line and a non-zero exit, a
4xx in the OpenAI shape, a contained program, a forged pass scored 0, no file modified...). Prints a table and a
JSON line.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

AREAS: dict[str, list[str]] = {
    "CLI usage errors (one line, exit != 0, no engine)": [
        "tests/unit/test_hostile_cli.py::test_usage_errors_are_one_line",
        "tests/unit/test_hostile_cli.py::test_no_arguments_prints_help",
        "tests/unit/test_hostile_cli.py::test_a_deep_yaml_recipe_is_an_error_not_a_recursion",
    ],
    "batch inputs (line number, nothing written)": [
        "tests/unit/test_hostile_cli.py::test_bad_batch_input_is_one_line_before_any_engine",
    ],
    "output paths (refused up front, files untouched)": [
        "tests/unit/test_hostile_cli.py::test_bad_output_paths_are_refused_before_any_engine",
        "tests/unit/test_hostile_cli.py::test_an_immutable_output_is_refused",
        "tests/unit/test_hostile_cli.py::test_an_existing_file_that_is_not_a_results_file_is_left_untouched",
        "tests/unit/test_hostile_cli.py::test_a_results_file_is_resumed_and_its_torn_line_cut",
    ],
    "server bodies and clients (4xx, never 500)": [
        "tests/unit/test_hostile_server.py",
        "tests/unit/test_server_errors.py",
    ],
    "fuzzed recipes and JSONL lines (value or one of our errors)": [
        "tests/unit/test_fuzz.py",
    ],
    "HumanEval sandbox: hostile programs (contained, forged passes 0)": [
        "tests/unit/test_sandbox_hostile.py",
    ],
}


def run(targets: list[str], xml: Path) -> list[tuple[str, str]]:
    """(test id, outcome) per case."""
    existing = [t for t in targets if (ROOT / t.split("::")[0]).is_file()]
    if not existing:
        return []
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}", *existing],
                   cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    out = []
    for case in ET.parse(xml).getroot().iter("testcase"):
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed"
            elif child.tag == "skipped":
                outcome = "skipped"
        out.append((f"{case.get('classname')}::{case.get('name')}", outcome))
    return out


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for area, targets in AREAS.items():
            cases = run(targets, Path(tmp) / "r.xml")
            tried = [c for c in cases if c[1] != "skipped"]
            clean = [c for c in tried if c[1] == "passed"]
            rows.append({"area": area, "tried": len(tried), "clean": len(clean),
                         "skipped": len(cases) - len(tried), "failed": [c[0] for c in tried if c[1] != "passed"]})
            print(f"{area}: {len(clean)}/{len(tried)}", flush=True)
    print("\n| area | cases tried | handled cleanly |\n|---|---:|---:|")
    for r in rows:
        skipped = f" ({r['skipped']} skipped)" if r["skipped"] else ""
        print(f"| {r['area']} | {r['tried']}{skipped} | {r['clean']} |")
    print(json.dumps({"tried": sum(r["tried"] for r in rows), "clean": sum(r["clean"] for r in rows),
                      "failed": [f for r in rows for f in r["failed"]]}))


if __name__ == "__main__":
    main()
