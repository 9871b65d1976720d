"""Offline evaluation: does a MoA recipe beat its own models? One module per suite (ifeval, humaneval, mtbench,
alpacaeval, math), the systems compared (systems.py), the loop that runs them on one shared set of engines
(runner.py), bootstrap CIs (bootstrap.py) and the report with its plot (report.py).

Data comes from installed packages (the `eval` extra), never from the repository or a hub. Importing this package
is cheap: suites import their data packages only when used.
"""

from moa_local.eval.base import Item, Score, Suite, get_suite, suite_names
from moa_local.eval.report import build_report, write_report
from moa_local.eval.runner import run_eval
from moa_local.eval.systems import BASELINES, System, build_systems, parse_baselines, self_moa_system

__all__ = [
    "BASELINES",
    "Item",
    "Score",
    "Suite",
    "System",
    "build_report",
    "build_systems",
    "get_suite",
    "parse_baselines",
    "run_eval",
    "self_moa_system",
    "suite_names",
    "write_report",
]
