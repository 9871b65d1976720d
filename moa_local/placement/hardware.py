"""Hardware specs: the GPUs (per node), CPU memory and cores a plan may use; parsed from CLI strings or detected.

Owns the card catalog, the `--gpus` / `--nodes` / `--cpu-memory` grammars and local detection (``nvidia-smi``,
``/proc/meminfo``, cgroup limits, CPU affinity). Memory convention: a card's memory is ``memory.total`` as
``nvidia-smi`` reports it (MiB), so a catalog spec and a detected card agree; an H100-80GB is 81559 MiB = 79.6 GiB.
Usable headroom (vLLM's 0.9 utilization) is the planner's business, not this module's.

Bad strings raise InputError naming the accepted forms. Never imports torch (it reads ``torch.cuda`` only when
torch is already imported) and never places anything.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from moa_local.errors import InputError

MIB = 1024**2
GIB = 1024**3

CARD_CATALOG_MIB: dict[str, int] = {
    "A100-40GB": 40960,
    "A100-80GB": 81920,
    "H100-80GB": 81559,
    "H100-94GB": 95830,
    "H200-141GB": 143771,
    "L40S-48GB": 46068,
    "A40-48GB": 46068,
    "A6000-48GB": 49140,
    "RTX6000ADA-48GB": 49140,
    "RTX4090-24GB": 24564,
    "RTX3090-24GB": 24576,
    "A10-24GB": 23028,
    "L4-24GB": 23034,
    "V100-16GB": 16384,
    "V100-32GB": 32768,
    "T4-16GB": 15360,
}
"""Known cards: ``memory.total`` in MiB as nvidia-smi reports it for the common SKU."""

_ALIASES: dict[str, str] = {
    "H100": "H100-80GB",
    "H200": "H200-141GB",
    "L40S": "L40S-48GB",
    "A40": "A40-48GB",
    "A6000": "A6000-48GB",
    "RTXA6000": "A6000-48GB",
    "RTX6000ADA": "RTX6000ADA-48GB",
    "RTX4090": "RTX4090-24GB",
    "4090": "RTX4090-24GB",
    "RTX3090": "RTX3090-24GB",
    "3090": "RTX3090-24GB",
    "A10": "A10-24GB",
    "L4": "L4-24GB",
    "T4": "T4-16GB",
}
_AMBIGUOUS: dict[str, tuple[str, ...]] = {
    "A100": ("A100-40GB", "A100-80GB"),
    "V100": ("V100-16GB", "V100-32GB"),
}

_UNITS: dict[str, int] = {
    "b": 1,
    "k": 1024,
    "kb": 1000,
    "kib": 1024,
    "m": MIB,
    "mb": 1000**2,
    "mib": MIB,
    "g": GIB,
    "gb": 1000**3,
    "gib": GIB,
    "t": 1024**4,
    "tb": 1000**4,
    "tib": 1024**4,
}

MAX_GPUS_PER_NODE = 64
"""The most GPUs one node may have in a --gpus / --nodes description."""

MAX_NODES = 1024
"""The most nodes a --nodes description may have."""

GPUS_FORMS = (
    "'8xH100-80GB', 'H100', '2x24GiB', '1xH100-80GB,2xRTX4090-24GB' or 'none' "
    f"(cards: {', '.join(CARD_CATALOG_MIB)})"
)
NODES_FORMS = "'2x8xH100-80GB' (nodes x GPUs per node x card), or several joined by commas"
MEMORY_FORMS = "'24GiB', '64GB', '512MiB', '1.5TiB' (GiB/MiB/TiB are powers of 1024, GB/MB/TB of 1000)"


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GpuSpec(_Closed):
    """One GPU."""

    name: str = Field(
        description="Card name (catalog name, nvidia-smi name, or the size for anonymous cards)."
    )
    memory_bytes: int = Field(gt=0, description="memory.total in bytes, as nvidia-smi reports it.")

    @property
    def memory_gib(self) -> float:
        return self.memory_bytes / GIB


class NodeSpec(_Closed):
    """One machine: its GPUs, in CUDA device order."""

    gpus: list[GpuSpec] = Field(default_factory=list, description="GPUs of this node (CUDA device order).")


class Hardware(_Closed):
    """What a plan may use. A node with no GPUs means CPU-only hardware."""

    nodes: list[NodeSpec] = Field(default_factory=lambda: [NodeSpec()], min_length=1, description="Machines.")
    cpu_memory_bytes: int = Field(gt=0, description="CPU memory budget in bytes (per node).")
    cpu_cores: int = Field(ge=1, description="CPU cores the engines may use (per node).")
    cpu_core_ids: list[int] | None = Field(
        None, description="Core ids from the CPU affinity mask; None means 0..cpu_cores-1."
    )

    @property
    def has_gpus(self) -> bool:
        return any(node.gpus for node in self.nodes)

    def slots(self) -> list[GpuSlot]:
        """Every GPU with its global index (the index plans use), node and local CUDA index."""
        out: list[GpuSlot] = []
        for n, node in enumerate(self.nodes):
            for i, gpu in enumerate(node.gpus):
                out.append(GpuSlot(index=len(out), node=n, local_index=i, spec=gpu))
        return out

    def core_ids(self) -> list[int]:
        ids = self.cpu_core_ids if self.cpu_core_ids else list(range(self.cpu_cores))
        return sorted(ids)[: self.cpu_cores]

    def describe(self) -> str:
        """A short human description, e.g. '8x H100-80GB (79.6 GiB), 2048 GiB CPU, 64 cores'."""
        parts = []
        for node in self.nodes:
            counts: dict[tuple[str, int], int] = {}
            for g in node.gpus:
                counts[(g.name, g.memory_bytes)] = counts.get((g.name, g.memory_bytes), 0) + 1
            gpus = " + ".join(f"{k}x {name} ({mem / GIB:.1f} GiB)" for (name, mem), k in counts.items())
            parts.append(gpus or "no GPU")
        nodes = parts[0] if len(parts) == 1 else " | ".join(f"node {i}: {p}" for i, p in enumerate(parts))
        return f"{nodes}; {self.cpu_memory_bytes / GIB:.0f} GiB CPU memory, {self.cpu_cores} cores"


@dataclass(frozen=True)
class GpuSlot:
    """A GPU seen by the planner: global index, node, CUDA index on that node, spec."""

    index: int
    node: int
    local_index: int
    spec: GpuSpec


def parse_memory(text: str) -> int:
    """'24GiB' -> bytes. Raises InputError listing the accepted forms."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = (m.group(2).lower() if m else "") or "gib"
    if not m or unit not in _UNITS:
        raise InputError(f"cannot read memory size '{text}'. Use a number with a unit: {MEMORY_FORMS}")
    value = float(m.group(1)) * _UNITS[unit]
    if value <= 0:
        raise InputError(f"memory size '{text}' must be positive. Use {MEMORY_FORMS}")
    return int(value)


def card_spec(name: str) -> GpuSpec:
    """A catalog card by name or alias (case-insensitive): 'H100', 'h100-80gb', 'RTX4090'."""
    key = name.strip().upper().replace("_", "-").replace(" ", "")
    key = _ALIASES.get(key, _ALIASES.get(key.replace("-", ""), key))
    if key in CARD_CATALOG_MIB:
        return GpuSpec(name=key, memory_bytes=CARD_CATALOG_MIB[key] * MIB)
    if key in _AMBIGUOUS:
        options = " or ".join(_AMBIGUOUS[key])
        raise InputError(f"'{name}' is ambiguous: say {options}")
    raise InputError(
        f"unknown GPU '{name}'. Use one of {', '.join(CARD_CATALOG_MIB)}, or a size like '24GiB'"
    )


def _parse_gpu_item(item: str, *, whole: str) -> list[GpuSpec]:
    m = re.fullmatch(r"\s*(?:(\d+)\s*[xX*]\s*)?(.+?)\s*", item)
    if not m or not m.group(2):
        raise InputError(f"cannot read --gpus '{whole}'. Accepted forms: {GPUS_FORMS}")
    count = int(m.group(1)) if m.group(1) else 1
    what = m.group(2)
    if count < 1 or count > MAX_GPUS_PER_NODE:
        raise InputError(f"--gpus '{whole}': the GPU count must be 1 to {MAX_GPUS_PER_NODE} per node. Accepted "
                         f"forms: {GPUS_FORMS}")
    if re.fullmatch(r"[0-9]*\.?[0-9]+\s*[a-zA-Z]*", what) and not re.fullmatch(r"\d+", what):
        try:
            memory = parse_memory(what)
        except InputError:
            raise InputError(f"cannot read --gpus '{whole}'. Accepted forms: {GPUS_FORMS}") from None
        spec = GpuSpec(name=f"{memory / GIB:g}GiB", memory_bytes=memory)
    else:
        try:
            spec = card_spec(what)
        except InputError as exc:
            raise InputError(f"--gpus '{whole}': {exc}. Accepted forms: {GPUS_FORMS}") from None
    return [spec] * count


def parse_gpus(text: str) -> list[GpuSpec]:
    """`--gpus`: '8xH100-80GB', 'H100', '2x24GiB', '1xH100-80GB,2xRTX4090-24GB', 'none' (CPU only)."""
    if text.strip().lower() in ("", "none", "0", "cpu"):
        return []
    gpus: list[GpuSpec] = []
    for item in text.split(","):
        gpus.extend(_parse_gpu_item(item, whole=text))
    return gpus


def parse_nodes(text: str) -> list[NodeSpec]:
    """`--nodes`: '2x8xH100-80GB' is two nodes of eight H100s; '1x8xH100-80GB,1x4xA100-80GB' mixes nodes."""
    nodes: list[NodeSpec] = []
    for item in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*[xX*]\s*(\d+\s*[xX*]\s*.+?)\s*", item)
        if not m or not 1 <= int(m.group(1)) <= MAX_NODES:
            raise InputError(f"cannot read --nodes '{text}' (1 to {MAX_NODES} nodes). Accepted forms: {NODES_FORMS}")
        gpus = _parse_gpu_item(m.group(2), whole=text)
        nodes.extend(NodeSpec(gpus=list(gpus)) for _ in range(int(m.group(1))))
    return nodes


# -- detection -------------------------------------------------------------------------------------------------


def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def detect_cpu_memory() -> int:
    """CPU memory in bytes: MemTotal from /proc/meminfo, capped by a cgroup limit (containers)."""
    total: int | None = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                total = int(line.split()[1]) * 1024
                break
    except OSError:
        pass
    if total is None:
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            total = 8 * GIB
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        limit = _read_int(limit_file)
        if limit is not None and 0 < limit < total:
            total = limit
    return total


def detect_cpu_cores() -> tuple[int, list[int]]:
    """Usable cores and their ids: the affinity mask, capped by a cgroup v2 CPU quota."""
    try:
        ids = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        ids = list(range(os.cpu_count() or 1))
    cores = len(ids)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = max(1, min(cores, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cores, ids[:cores]


def _visible_filter(rows: list[tuple[str, str, str, int]]) -> list[tuple[str, str, str, int]]:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return rows
    wanted = [v.strip() for v in visible.split(",") if v.strip()]
    chosen = []
    for w in wanted:
        for row in rows:
            if w in (row[0], row[1]):
                chosen.append(row)
    return chosen


def detect_gpus(*, timeout_s: float = 10.0) -> list[GpuSpec]:
    """Local GPUs via ``nvidia-smi`` (respecting CUDA_VISIBLE_DEVICES); via torch.cuda only if torch is already
    imported; else none."""
    cmd = ["nvidia-smi", "--query-gpu=index,uuid,name,memory.total", "--format=csv,noheader,nounits"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    rows: list[tuple[str, str, str, int]] = []
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 4 and parts[3].isdigit():
            rows.append((parts[0], parts[1], parts[2], int(parts[3])))
    if rows:
        return [GpuSpec(name=name, memory_bytes=mib * MIB) for _, _, name, mib in _visible_filter(rows)]
    torch: Any = sys.modules.get("torch")
    if torch is not None:
        try:
            if torch.cuda.is_available():
                return [
                    GpuSpec(
                        name=str(torch.cuda.get_device_name(i)),
                        memory_bytes=int(torch.cuda.get_device_properties(i).total_memory),
                    )
                    for i in range(torch.cuda.device_count())
                ]
        except Exception:  # noqa: BLE001 - a broken CUDA install means "no GPU" for planning
            return []
    return []


def detect_hardware() -> Hardware:
    """This machine: its GPUs (one node), CPU memory and cores."""
    cores, ids = detect_cpu_cores()
    return Hardware(
        nodes=[NodeSpec(gpus=detect_gpus())],
        cpu_memory_bytes=detect_cpu_memory(),
        cpu_cores=cores,
        cpu_core_ids=ids,
    )


def build_hardware(
    *,
    gpus: str | None = None,
    nodes: str | None = None,
    cpu_memory: str | None = None,
    cpu_cores: int | None = None,
    detect: bool = True,
) -> Hardware:
    """The CLI's hardware: `--gpus`/`--nodes`/`--cpu-memory`/`--cpu-cores` where given, the rest detected
    (or defaults of 64 GiB and 8 cores with ``detect=False``)."""
    if gpus is not None and nodes is not None:
        raise InputError("give either --gpus (one node) or --nodes (several), not both")
    if cpu_cores is not None and cpu_cores < 1:
        raise InputError(f"--cpu-cores must be at least 1, got {cpu_cores}")
    node_specs: list[NodeSpec] | None = None
    if nodes is not None:
        node_specs = parse_nodes(nodes)
    elif gpus is not None:
        node_specs = [NodeSpec(gpus=parse_gpus(gpus))]
    if node_specs is None:
        node_specs = [NodeSpec(gpus=detect_gpus())] if detect else [NodeSpec()]
    memory = (
        parse_memory(cpu_memory) if cpu_memory is not None else (detect_cpu_memory() if detect else 64 * GIB)
    )
    ids: list[int] | None = None
    if cpu_cores is None:
        cpu_cores, ids = detect_cpu_cores() if detect else (8, None)
    return Hardware(nodes=node_specs, cpu_memory_bytes=memory, cpu_cores=cpu_cores, cpu_core_ids=ids)
