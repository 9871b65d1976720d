"""Peak memory of a batch job against its size: the fake backend, 1,000 / 100,000 / 1,000,000 prompts.

    .venv/bin/python scripts/bench_memory.py --sizes 1000 100000 1000000

Each size runs `moa-local run --recipe fake --input IN --output OUT` in a fresh process (the fake backend answers
at once, so the job is all scheduler, JSONL and bookkeeping) and reads its peak RSS from the kernel
(``ru_maxrss`` of the finished child). A streamed job holds only its window of conversations, the on-disk id
indexes' page caches and the output buffer, so its peak should not grow with the job. Prints a table and a JSON
line with ``peak_mb`` per size and ``ratio_largest_over_smallest``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def write_input(path: Path, n: int) -> None:
    with path.open("w", encoding="utf-8") as fh:
        for i in range(n):
            fh.write(json.dumps({"id": f"q{i}", "prompt": f"Question number {i}: why is the sky blue?"}) + "\n")


def run_job(n: int, folder: Path) -> dict[str, float]:
    src, out, summary = folder / f"in-{n}.jsonl", folder / f"out-{n}.jsonl", folder / f"summary-{n}.json"
    write_input(src, n)
    cmd = [sys.executable, "-c", "from moa_local.cli import main; main()", "run", "--recipe", "fake",
           "--input", str(src), "--output", str(out), "--summary-json", str(summary)]
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # the child execs the job, so ru_maxrss of RUSAGE_CHILDREN is its own peak
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        os.execv(cmd[0], cmd)
    _, status, usage = os.wait4(pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"the job of {n} prompts failed: {subprocess.list2cmdline(cmd)}")
    lines = sum(1 for _ in out.open("rb"))
    result = json.loads(summary.read_text())
    for path in (src, out, summary):
        path.unlink()
    return {"prompts": n, "peak_mb": usage.ru_maxrss / 1024, "wall_s": wall, "written": lines, "ok": result["ok"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 100_000, 1_000_000])
    ap.add_argument("--folder", type=Path, default=None, help="where the JSONL files go (default: a temp folder)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.folder) as tmp:
        rows = []
        for n in args.sizes:
            rows.append(run_job(n, Path(tmp)))
            r = rows[-1]
            print(f"{n} prompts: peak {r['peak_mb']:.1f} MB, {r['wall_s']:.1f} s", flush=True)
    print("\n| prompts | peak RSS (MB) | wall (s) | records written |\n|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['prompts']:,} | {r['peak_mb']:.1f} | {r['wall_s']:.1f} | {r['written']:,} |")
    ratio = rows[-1]["peak_mb"] / rows[0]["peak_mb"]
    print()
    print(json.dumps({"peak_mb": {str(r["prompts"]): round(r["peak_mb"], 1) for r in rows},
                      "ratio_largest_over_smallest": round(ratio, 3)}))


if __name__ == "__main__":
    main()
