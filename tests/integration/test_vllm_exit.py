"""No vLLM worker outlives `moa-local run`: Ctrl-C (SIGINT) in the middle of a run on the real vllm backend ends the
command promptly and takes every worker process (and vLLM's EngineCore) with it."""

from __future__ import annotations

import importlib.util
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from moa_local.config import load_model_config
from moa_local.engines.worker import pid_alive
from moa_local.models import is_prepared

pytestmark = [
    pytest.mark.integration,
    pytest.mark.vllm,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed"),
]

SMOL = "smollm2-135m-instruct"
ENGINE = {"dtype": "float32", "max_model_len": 2048, "enforce_eager": True, "cpu_kvcache_gib": 1}



def test_sigint_mid_run_leaves_no_worker_behind(tmp_path: Path) -> None:
    if not is_prepared(load_model_config(SMOL)):
        pytest.skip(f"{SMOL} not prepared: run `moa-local models prepare`")
    import psutil

    long = {"temperature": 0.5, "max_tokens": 1900, "ignore_eos": True, "seed": 1}  # far longer than the test waits
    recipe = tmp_path / "one-model.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "one-model", "backend": "vllm", "layers": 1,
        "proposers": [{"model": SMOL, "name": "smollm2", "sampling": long, "samples": 4}],
        "aggregator": {"model": SMOL, "name": "aggregator", "sampling": long},
        "engines": {SMOL: ENGINE},
    }))
    cli = Path(sys.executable).parent / "moa-local"
    # SIGINT back to its default in the child: a test runner started in the background may ignore it, and Python
    # only turns SIGINT into KeyboardInterrupt when it starts with the default disposition (as in a terminal).
    proc = subprocess.Popen([str(cli), "run", "--recipe", str(recipe), "Count to one thousand."],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert proc.stderr is not None
        seen = []
        deadline = time.monotonic() + 240
        for line in proc.stderr:  # wait until the engine is up and the layer is running
            seen.append(line)
            if "layer 1/1: 0/4" in line or time.monotonic() > deadline:
                break
        assert any("layer 1/1: 0/4" in x for x in seen), "".join(seen[-30:])
        time.sleep(1.0)
        workers = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
        assert len(workers) >= 2, workers  # the worker and its EngineCore at least
        proc.send_signal(signal.SIGINT)
        start = time.monotonic()
        proc.wait(60)
        assert time.monotonic() - start < 20  # the 4 x 1900-token answers were not awaited
        assert proc.returncode == 130, proc.stderr.read()[-2000:]  # "aborted", not finished
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(pid_alive(p) for p in workers):
            time.sleep(0.1)
        assert [p for p in workers if pid_alive(p)] == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
