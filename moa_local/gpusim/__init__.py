"""A simulated GPU server for tests: a stand-in ``vllm`` that enforces vLLM 0.32's CUDA rules on cards that exist
only as a memory ledger in a folder, loaded in moa-local's *real* worker processes.

  box.py         the cards (CUDA totals) and the ledger every process of the box shares; the record tests read
  accounting.py  vLLM's per-rank arithmetic (context, NCCL, weights, profiling peak, sampler, graphs, KV)
  engine.py      the ``vllm.LLM`` stand-in: start-up checks, requests, sleep levels
  weights.py     simulated weights folders (config.json, a byte-level tokenizer, the vendored chat template)
  stub/vllm/     the package named ``vllm`` a worker imports instead of the real one

A worker whose environment has ``MOA_LOCAL_GPU_SIM=<box folder>`` calls ``install()`` before its host imports
vllm (engines/worker.py). Nothing here imports moa_local.placement: the simulator checks the planner, it does not
share its arithmetic. docs/placement.md says what it checks and what it cannot.
"""

from __future__ import annotations

import sys
from pathlib import Path

from moa_local.gpusim.box import ENV, Box, CudaOutOfMemory, parse_cards

STUB = Path(__file__).parent / "stub"
"""Put first on sys.path, this folder's ``vllm`` package shadows the installed one."""

__all__ = ["ENV", "STUB", "Box", "CudaOutOfMemory", "install", "parse_cards"]


def install() -> None:
    """Make ``import vllm`` load the stand-in in this process (call before anything imports vllm)."""
    for name in [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")]:
        del sys.modules[name]
    if str(STUB) not in sys.path:
        sys.path.insert(0, str(STUB))
