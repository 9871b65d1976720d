"""CPU core splitting for co-resident vLLM-CPU engines. Pure: never imports vllm or torch, never starts anything.

vLLM-CPU pins each engine's OpenMP threads to the cores named in ``VLLM_CPU_OMP_THREADS_BIND``. Engines that share
cores slow each other down (on 2 cores, two engines on "0-1" each reach ~half the speed of "0" / "1"), so engines
resident together get disjoint core sets: 2 cores, 2 engines -> "0" and "1"; 1 engine -> "0-1". Cores come from
``os.sched_getaffinity`` (a container or ``taskset`` may allow fewer than the machine has). The planner decides the
bindings (placement/planner.py) with these helpers; nothing else assigns cores.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence

_BIND_SPECIAL = ("auto", "nobind")
_CPU_LIST = re.compile(r"^\d+(-\d+)?(,\d+(-\d+)?)*$")


def available_cores() -> list[int]:
    """The cores this process may run on, sorted."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


def format_cores(cores: Iterable[int]) -> str:
    """A vLLM CPU list: [0, 1, 2, 5] -> "0-2,5"."""
    ordered = sorted(set(cores))
    if not ordered:
        raise ValueError("no cores to format")
    parts: list[str] = []
    start = prev = ordered[0]
    for core in [*ordered[1:], None]:
        if core is not None and core == prev + 1:
            prev = core
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if core is not None:
            start = prev = core
    return ",".join(parts)


def parse_cores(binding: str) -> set[int]:
    """The cores a binding names ("0-2,5" or ranks split by "|"); empty for "auto" / "nobind".
    Raises ValueError naming the accepted forms."""
    if binding in _BIND_SPECIAL:
        return set()
    cores: set[int] = set()
    for rank in binding.split("|"):
        if not _CPU_LIST.match(rank):
            raise ValueError(
                f"cpu_threads '{binding}' is not a core binding; expected 'auto', 'nobind' or a CPU list "
                "such as '0', '0-3', '0,2' (ranks separated by '|')"
            )
        for part in rank.split(","):
            lo, _, hi = part.partition("-")
            first, last = int(lo), int(hi or lo)
            if last < first:
                raise ValueError(f"cpu_threads '{binding}': range {part} runs backwards")
            cores.update(range(first, last + 1))
    return cores


def split_cores(n_engines: int, cores: Sequence[int]) -> list[str]:
    """Disjoint, contiguous core sets for ``n_engines`` engines, as vLLM CPU lists.

    More engines than cores: engines share cores round-robin (one core each)."""
    if n_engines <= 0:
        return []
    ordered = sorted(set(cores))
    if not ordered:
        raise ValueError("no cores available")
    if n_engines > len(ordered):
        return [str(ordered[i % len(ordered)]) for i in range(n_engines)]
    base, extra = divmod(len(ordered), n_engines)
    out, start = [], 0
    for i in range(n_engines):
        size = base + (1 if i < extra else 0)
        out.append(format_cores(ordered[start : start + size]))
        start += size
    return out
