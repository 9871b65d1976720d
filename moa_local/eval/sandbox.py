"""Runs untrusted model-written Python in a separate, limited process: never in this process.

Each program runs in a fresh ``python -I -S`` child (standard library only) inside an empty temporary folder that is deleted afterwards, with
stdin closed, a minimal environment, and limits set by the child on itself (``resource.setrlimit``) before the
program's first line runs: address space, CPU seconds, file size, open files. A wall-clock timeout kills the
child's whole process group. This is a limit, not a security sandbox: run evaluations on a machine you can afford
to lose. Knows nothing about suites or models.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

# The child sets its own limits, runs the program file, and prints the parent's nonce only if the program returned
# normally (so a program that calls exit(0) early does not pass).
_LAUNCHER = """
import os, resource, runpy, sys
mem, cpu, nonce = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
sys.argv = ["program.py"]
runpy.run_path(os.environ.pop("MOA_PROGRAM"), run_name="__main__")
sys.stdout.flush()
os.write(1, ("\\n" + nonce + "\\n").encode())
"""


@dataclass(frozen=True)
class Outcome:
    """How one program ended: ``passed`` only on exit code 0 within the time limit."""

    passed: bool
    status: str  # passed | failed | timed out
    detail: str = ""


def run_program(source: str, *, timeout_s: float = 10.0, memory_mb: int = 1024) -> Outcome:
    """Run ``source`` in a limited child process; passed when it returns normally within ``timeout_s``.
    Output goes to files in the child's folder (so the file-size limit bounds it), never into this process's memory."""
    with tempfile.TemporaryDirectory(prefix="moa-eval-exec-") as work:
        program = os.path.join(work, "program.py")
        with open(program, "w", encoding="utf-8") as fh:
            fh.write(source)
        env = {"MOA_PROGRAM": program, "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1", "PATH": "/usr/bin:/bin"}
        nonce = secrets.token_hex(16)
        cmd = [sys.executable, "-I", "-S", "-c", _LAUNCHER, str(memory_mb << 20), str(max(1, int(timeout_s) + 1)), nonce]
        out_path, err_path = os.path.join(work, "stdout"), os.path.join(work, "stderr")
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(cmd, cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    start_new_session=True)
            try:
                proc.wait(timeout=timeout_s)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)  # the whole group: whatever the program forked dies too
                proc.wait()
        if timed_out:
            return Outcome(False, "timed out", f"no exit within {timeout_s:g} s")
        stdout = _tail(out_path)
        if proc.returncode == 0 and stdout.rstrip("\n").endswith(nonce):
            return Outcome(True, "passed")
        lines = [line for line in _tail(err_path).strip().splitlines() if line.strip()]
        reason = lines[-1] if lines else f"exit code {proc.returncode}" + (" before the end" if proc.returncode == 0 else "")
        return Outcome(False, "failed", reason[:300])


def _tail(path: str, size: int = 4096) -> str:
    with open(path, "rb") as fh:
        fh.seek(max(0, os.path.getsize(path) - size))
        return fh.read().decode("utf-8", errors="replace")


def run_programs(sources: Sequence[str], *, timeout_s: float = 10.0, memory_mb: int = 1024,
                 workers: int = 2) -> list[Outcome]:
    """Run many programs, ``workers`` children at a time; outcomes keep the order of ``sources``."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(lambda s: run_program(s, timeout_s=timeout_s, memory_mb=memory_mb), sources))
