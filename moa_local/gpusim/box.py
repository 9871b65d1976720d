"""The simulated GPU server's hardware: its cards and one memory ledger that every process on the box shares.

Owns the card catalog (CUDA's total per card, the number vLLM budgets against), the box folder (``box.json``,
``ledger.json`` guarded by a file lock, ``events.jsonl``), allocations and frees per process, rank and tag, the
CUDA out-of-memory error, and the record every test reads back: each allocation's per-GPU total, the peak of every
GPU, engine starts, sleeps, wakes and requests. Memory of a process that is gone is freed the next time anyone looks
(as the driver does when a process exits).

Never imports moa_local.placement (the simulator must not check the planner against itself) and never imports
torch or vllm.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GIB = 1024**3
MIB = 1024**2

CARDS: dict[str, int] = {
    "H100-80GB": 85017755648,
    "A100-80GB": 84987740160,
    "A100-40GB": 42298834944,
    "H200-141GB": 143156 * MIB,
    "RTX4090-24GB": 25386352640,
}
"""CUDA's total memory per card (``cudaMemGetInfo``), as published deviceQuery / torch outputs show it: H100 80GB
HBM3, A100-SXM4-80GB, A100-SXM4-40GB, RTX 4090 on Linux, H200."""

ENV = "MOA_LOCAL_GPU_SIM"
"""Path of the box folder; set in a worker's environment, it makes the worker load the stand-in vllm."""


class CudaOutOfMemory(RuntimeError):
    """What CUDA raises when an allocation does not fit (torch.OutOfMemoryError's message)."""


@dataclass(frozen=True)
class Card:
    index: int
    name: str
    total: int


def parse_cards(text: str) -> list[Card]:
    """'8xH100-80GB' or '2xRTX4090-24GB,1xH200-141GB' -> cards in index order."""
    cards: list[Card] = []
    for item in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*x\s*(.+?)\s*", item)
        if not m or m.group(2) not in CARDS:
            raise ValueError(f"unknown simulated card list '{text}'; cards: {', '.join(CARDS)}")
        for _ in range(int(m.group(1))):
            cards.append(Card(len(cards), m.group(2), CARDS[m.group(2)]))
    return cards


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2 :].split()[0] != "Z"


class Box:
    """A simulated multi-GPU server living in folder ``path`` (shared by every process of a test)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        meta = json.loads((self.path / "box.json").read_text())
        self.cards = [Card(i, c["name"], c["total"]) for i, c in enumerate(meta["cards"])]

    @classmethod
    def create(cls, path: str | Path, cards: str) -> Box:
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        specs = [{"name": c.name, "total": c.total} for c in parse_cards(cards)]
        (folder / "box.json").write_text(json.dumps({"cards": specs}))
        (folder / "ledger.json").write_text(json.dumps({"allocs": [], "peak": [0] * len(specs)}))
        (folder / "events.jsonl").write_text("")
        return cls(folder)

    @classmethod
    def from_env(cls) -> Box:
        path = os.environ.get(ENV)
        if not path:
            raise RuntimeError(f"no simulated GPU server: ${ENV} is not set")
        return cls(path)

    # -- the ledger ------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _ledger(self) -> Iterator[dict[str, Any]]:
        with open(self.path / "box.lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                ledger = json.loads((self.path / "ledger.json").read_text())
                alive = {pid: _alive(pid) for pid in {a["pid"] for a in ledger["allocs"]}}
                ledger["allocs"] = [a for a in ledger["allocs"] if alive[a["pid"]]]  # the driver frees the dead
                yield ledger
                tmp = self.path / "ledger.json.tmp"
                tmp.write_text(json.dumps(ledger))
                tmp.replace(self.path / "ledger.json")
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    @staticmethod
    def _used(ledger: dict[str, Any], gpu: int) -> int:
        return sum(a["bytes"] for a in ledger["allocs"] if a["gpu"] == gpu)

    def used(self, gpu: int) -> int:
        with self._ledger() as ledger:
            return self._used(ledger, gpu)

    def free_memory(self, gpu: int) -> int:
        """``cudaMemGetInfo``'s free bytes of ``gpu``."""
        return self.cards[gpu].total - self.used(gpu)

    def alloc(self, gpu: int, nbytes: int, *, tag: str, engine: str) -> None:
        """Map ``nbytes`` on ``gpu`` for this process; CudaOutOfMemory when they do not fit."""
        card = self.cards[gpu]
        with self._ledger() as ledger:
            used = self._used(ledger, gpu)
            if used + nbytes > card.total:
                self.event("oom", engine=engine, gpu=gpu, tag=tag, bytes=nbytes, used=used)
                raise CudaOutOfMemory(
                    f"CUDA out of memory. Tried to allocate {nbytes / GIB:.2f} GiB. GPU {gpu} has a total capacity of "
                    f"{card.total / GIB:.2f} GiB of which {(card.total - used) / GIB:.2f} GiB is free."
                )
            ledger["allocs"].append({"pid": os.getpid(), "gpu": gpu, "tag": tag, "bytes": int(nbytes), "engine": engine})
            ledger["peak"][gpu] = max(ledger["peak"][gpu], used + nbytes)
        self.event("alloc", engine=engine, gpu=gpu, tag=tag, bytes=int(nbytes), used=used + nbytes)

    def free(self, *, engine: str, tags: tuple[str, ...] | None = None) -> None:
        """Unmap this process's allocations of ``engine`` (those with ``tags``, or all)."""
        me = os.getpid()
        with self._ledger() as ledger:
            ledger["allocs"] = [
                a for a in ledger["allocs"]
                if not (a["pid"] == me and a["engine"] == engine and (tags is None or a["tag"] in tags))
            ]

    def peaks(self) -> list[int]:
        """The most memory each GPU ever had mapped."""
        with self._ledger() as ledger:
            return list(ledger["peak"])

    # -- the record ------------------------------------------------------------------------------------------

    def event(self, kind: str, **data: Any) -> None:
        line = json.dumps({"kind": kind, "pid": os.getpid(), "t": time.time(), **data})
        with open(self.path / "events.jsonl", "a") as out:
            out.write(line + "\n")

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        rows = [json.loads(x) for x in (self.path / "events.jsonl").read_text().splitlines() if x]
        return [r for r in rows if kind is None or r["kind"] == kind]
