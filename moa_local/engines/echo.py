"""A test double of a worker host: the process machinery (spawn, ready handshake, calls, streams, death, shutdown)
checked without vLLM. Lives beside ``fake.py``, the test double of an engine; never used outside tests."""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from moa_local.engines.worker import Reply


class EchoHost:
    """A test double: "generate" answers a list of strings upper-cased after ``delay_s``; "stream" yields the words
    of one string; "crash" makes the worker exit at once. Lets tests check spawn, death and shutdown without vLLM."""

    def __init__(self, *, delay_s: float = 0.0, fail_start: bool = False, start_delay_s: float = 0.0) -> None:
        time.sleep(start_delay_s)
        if fail_start:
            print("echo host: refusing to start as asked", file=sys.stderr)
            raise RuntimeError("asked to fail")
        self.delay_s = delay_s
        self.info = {"pid": os.getpid(), "pgid": os.getpgid(0), "env": dict(os.environ)}
        self._due: list[tuple[float, int, Any]] = []

    def handle(self, op: str, call_id: int, payload: Any, reply: Reply) -> None:
        if op == "crash":
            os._exit(3)
        if op == "spawn_child":  # a grandchild in the group, like vLLM's EngineCore
            import subprocess

            proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
            reply("result", call_id, proc.pid)
            return
        if op == "generate":
            self._due.append((time.monotonic() + self.delay_s, call_id, [str(p).upper() for p in payload]))
            return
        if op == "stream":
            for word in str(payload).split():
                reply("delta", call_id, word)
            reply("result", call_id, None)
            return
        if op == "abort":
            return
        raise ValueError(f"unknown op '{op}'")

    def busy(self) -> bool:
        return bool(self._due)

    def step(self, reply: Reply) -> None:
        now = time.monotonic()
        for item in [d for d in self._due if d[0] <= now]:
            self._due.remove(item)
            reply("result", item[1], item[2])
        time.sleep(0.005)

    def close(self) -> None:
        self._due.clear()
