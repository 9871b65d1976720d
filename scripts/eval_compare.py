"""Compare two systems from two `moa-local eval` folders of the same suite on the items both scored (paired).

    .venv/bin/python scripts/eval_compare.py docs/eval/ifeval-3layer-50:moa docs/eval/ifeval:moa

For recipe changes run in their own folder (another recipe cannot share a results folder): prints each side's mean
with its 95% bootstrap CI over the common items, and the paired difference A - B with its CI and P(A <= B), the
same statistics as report.md (10,000 resamples, seed 0). Reads files only.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from moa_local.eval.bootstrap import bootstrap_mean, paired_difference
from moa_local.eval.results import load_records, read_run_info


def scores(spec: str) -> tuple[str, str, dict[str, float]]:
    """'FOLDER:SYSTEM' -> (suite, label, {item: score}) for the scored items."""
    folder, _, system = spec.partition(":")  # system names contain ":" (proposer:smollm2)
    if not folder:
        raise SystemExit(f"expected FOLDER:SYSTEM, got '{spec}'")
    rows = [r for r in load_records(Path(folder)) if r["system"] == system and r["score"] is not None]
    if not rows:
        raise SystemExit(f"no scored rows of system '{system}' in {folder}")
    info = read_run_info(Path(folder))
    return str(info.get("suite")), f"{info.get('recipe')} {system}", {r["item"]: float(r["score"]) for r in rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("a", help="FOLDER:SYSTEM, e.g. docs/eval/ifeval-3layer-50:moa")
    ap.add_argument("b", help="FOLDER:SYSTEM, e.g. docs/eval/ifeval:moa")
    args = ap.parse_args()
    (suite_a, label_a, a), (suite_b, label_b, b) = scores(args.a), scores(args.b)
    if suite_a != suite_b:
        raise SystemExit(f"different suites: {suite_a} vs {suite_b}")
    common = [item for item in a if item in b]  # A's file order, as report.md pairs them: the same resamples
    if not common:
        raise SystemExit("no item scored by both")
    xa, xb = [a[i] for i in common], [b[i] for i in common]
    print(f"# {suite_a}: {len(common)} items scored by both\n")
    print("| system | mean | 95% CI |\n|---|---|---|")
    for label, xs in ((label_a, xa), (label_b, xb)):
        iv = bootstrap_mean(xs)
        print(f"| {label} | {iv.mean:.3f} | [{iv.low:.3f}, {iv.high:.3f}] |")
    d = paired_difference(xa, xb)
    print(f"\nA - B = {d.mean:+.3f}, 95% paired CI [{d.low:+.3f}, {d.high:+.3f}], P(A <= B) = {d.p_not_better:.3f}")


if __name__ == "__main__":
    main()
