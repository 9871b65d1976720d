"""An engine's worker process, seen from both ends: spawn, ready handshake, the message pipe, health, death and
shutdown of the worker's whole process tree. Knows nothing about vLLM, prompts or models: the *host* it runs does.

Parent side, ``WorkerProcess(spec)``:
  1. spawns ``worker_main`` (multiprocessing "spawn" context) and blocks until the host says ``ready``, or raises
     EngineStartError with the last lines of the worker's log (start failed, worker died, or start timeout);
  2. sends calls and routes every reply to its caller from one reader thread, which also notices death (pipe
     closed, or the process gone, checked every ``POLL_S``) and then fails every call in flight with
     EngineDiedError and kills what is left of the worker's process group: a dead worker never hangs a caller;
  3. ``close()``: asks the worker to stop, waits, then SIGTERM / SIGKILL to the whole process group (vLLM's
     EngineCore and its executor workers are in it). An atexit hook closes every worker still open.

Child side, ``worker_main(conn, spec)``: starts its own session (so Ctrl-C in a terminal reaches only the parent,
which shuts workers down in order, and its process group holds every process vLLM starts), sends stdout/stderr to
``spec.log_path``, watches its parent (when the parent is gone, the worker SIGKILLs its own group), sets
``spec.env`` *before* the host is imported, builds the host, then loops: take messages (blocking only while the
host is idle), let the host make one step.

Protocol (tuples over a multiprocessing Pipe):
  parent -> worker: ``(op, call_id, payload)``; ``op`` is the host's ("generate", "stream", "abort", ...) or
                    "shutdown".
  worker -> parent: ``("ready", 0, info)`` or ``("start_failed", 0, text)`` once, then replies
                    ``("delta", call_id, piece)`` (more to come), ``("result", call_id, payload)`` (call done),
                    ``("error", call_id, text)`` (call failed), ``("fatal", 0, text)`` (the host broke; worker exits).
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import multiprocessing
import os
import queue
import signal
import sys
import threading
import time
import traceback
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Protocol

from moa_local.errors import EngineDiedError, EngineError, EngineStartError

POLL_S = 0.2
"""How often waiting parents and the reader thread check that the worker still lives (bounds death detection)."""

Reply = Callable[[str, int, Any], None]


class Host(Protocol):
    """What a worker hosts (e.g. one vLLM engine). Built inside the worker by ``spec.host(**spec.host_args)``."""

    info: dict[str, Any]

    def handle(self, op: str, call_id: int, payload: Any, reply: Reply) -> None:
        """Take one call; answer now or later (from ``step``) through ``reply``."""

    def busy(self) -> bool:
        """Work is in flight: the loop must keep calling ``step`` instead of blocking on the pipe."""

    def step(self, reply: Reply) -> None:
        """Advance the work in flight by one step and send what finished."""

    def close(self) -> None:
        """Free resources before the worker exits."""


@dataclass(frozen=True)
class WorkerSpec:
    """Everything the worker process needs; picklable."""

    name: str
    host: str  # "module:callable"
    host_args: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    log_path: str = ""
    parent_pid: int = 0


# -- child side -----------------------------------------------------------------------------------------------------


def _redirect_output(log_path: str) -> None:
    if not log_path:
        return
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def _watch_parent(parent_pid: int) -> None:
    """Kill this worker's whole process group as soon as the parent is gone (reparented: ppid changes)."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(POLL_S)
        os.killpg(os.getpgid(0), signal.SIGKILL)

    threading.Thread(target=watch, name="moa-parent-watch", daemon=True).start()


def _kill_rest_of_group() -> None:
    me = os.getpid()
    for pid in group_pids(os.getpgid(0)):
        if pid != me:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


def _load_host(dotted: str) -> Callable[..., Host]:
    module, _, attr = dotted.partition(":")
    factory: Callable[..., Host] = getattr(importlib.import_module(module), attr)
    return factory


def worker_main(conn: Connection, spec: WorkerSpec) -> None:
    """The worker process's entry point (runs in the child)."""
    with contextlib.suppress(OSError):  # already a group leader
        os.setsid()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    _redirect_output(spec.log_path)
    _watch_parent(spec.parent_pid or os.getppid())
    os.environ.update(spec.env)
    try:
        host = _load_host(spec.host)(**spec.host_args)
    except BaseException as exc:  # report any start failure, then exit
        traceback.print_exc()
        sys.stderr.flush()
        with contextlib.suppress(OSError):
            conn.send(("start_failed", 0, f"{type(exc).__name__}: {exc}"))
        os._exit(1)
    conn.send(("ready", 0, host.info))
    code = serve(conn, host)
    sys.stdout.flush()
    sys.stderr.flush()
    _kill_rest_of_group()  # whatever the host started and did not stop (the parent may be gone already)
    os._exit(code)  # skip interpreter teardown


def serve(conn: Connection, host: Host) -> int:
    """The worker loop. Returns the exit code."""

    def reply(kind: str, call_id: int, payload: Any) -> None:
        conn.send((kind, call_id, payload))

    try:
        while True:
            wait = 0.0 if host.busy() else 1.0
            while conn.poll(wait):
                op, call_id, payload = conn.recv()
                if op == "shutdown":
                    return 0
                try:
                    host.handle(op, call_id, payload, reply)
                except Exception as exc:  # one bad call fails that call only
                    traceback.print_exc()
                    reply("error", call_id, f"{type(exc).__name__}: {exc}")
                wait = 0.0
            if host.busy():
                host.step(reply)
    except (EOFError, OSError):  # the parent closed the pipe
        return 0
    except BaseException as exc:  # the host broke: say so, then exit
        traceback.print_exc()
        with contextlib.suppress(OSError):
            reply("fatal", 0, f"{type(exc).__name__}: {exc}")
        return 1
    finally:
        with contextlib.suppress(Exception):
            host.close()


# -- parent side ----------------------------------------------------------------------------------------------------


def _stat_fields(pid: int | str) -> list[str] | None:
    """/proc/PID/stat after the command name: state, ppid, pgrp, ...; None when the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rfind(")") + 2 :].split()


def pid_alive(pid: int) -> bool:
    """The process exists and is not a zombie (Linux /proc)."""
    fields = _stat_fields(pid)
    return fields is not None and fields[0] != "Z"


def group_pids(pgid: int) -> list[int]:
    """Live processes in process group ``pgid`` (Linux /proc; zombies excluded)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(entry.name)
        if fields is not None and fields[0] != "Z" and int(fields[2]) == pgid:
            pids.append(int(entry.name))
    return pids


def log_tail(path: str | Path, *, lines: int = 25) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.rstrip().splitlines()[-lines:])


_LIVE: weakref.WeakSet[WorkerProcess] = weakref.WeakSet()
_ATEXIT_REGISTERED = False


def _close_all() -> None:
    for worker in list(_LIVE):
        with contextlib.suppress(Exception):
            worker.close(grace_s=3.0)


def _register(worker: WorkerProcess) -> None:
    global _ATEXIT_REGISTERED
    if not _ATEXIT_REGISTERED:
        # Registered after multiprocessing's own exit hook, so it runs first (atexit is LIFO): workers are closed
        # before multiprocessing joins its children.
        atexit.register(_close_all)
        _ATEXIT_REGISTERED = True
    _LIVE.add(worker)


class WorkerProcess:
    """A started worker: ``call`` / ``stream_call`` send work; ``close`` ends the whole process tree."""

    def __init__(self, spec: WorkerSpec, *, start_timeout_s: float, wait: bool = True) -> None:
        self.spec = spec
        self.name = spec.name
        self.log_path = spec.log_path
        self.info: dict[str, Any] = {}
        self._calls: dict[int, Callable[[tuple[str, Any]], None]] = {}
        """Call id -> where its replies go (a queue's put, or a caller's callback run in the reader thread)."""
        self._calls_lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._next_id = 1
        self._dead: str | None = None
        self._closed = False
        ctx = multiprocessing.get_context("spawn")
        self._conn, child_conn = ctx.Pipe(duplex=True)
        if not spec.parent_pid:
            spec = WorkerSpec(**{**spec.__dict__, "parent_pid": os.getpid()})
        self.process = ctx.Process(target=worker_main, args=(child_conn, spec), name=f"moa-worker-{spec.name}")
        self.process.start()
        child_conn.close()
        self.pid: int = self.process.pid or 0
        self.pgid = self.pid  # the worker calls setsid(): it leads its own group
        self._start_timeout_s = start_timeout_s
        self._started_at = time.monotonic()
        self._ready = False
        _register(self)
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        """Block until the host is loaded (start several workers, then wait for each: they load in parallel).
        On failure the worker is killed and EngineStartError raised."""
        if self._ready:
            return
        try:
            self.info = self._wait_ready(self._start_timeout_s - (time.monotonic() - self._started_at))
        except BaseException:
            self._kill_group()
            self._closed = True
            _LIVE.discard(self)
            raise
        self._ready = True
        self._reader = threading.Thread(target=self._read_loop, name=f"moa-reader-{self.name}", daemon=True)
        self._reader.start()

    # -- start ------------------------------------------------------------------------------------------------

    def _start_error(self, what: str) -> EngineStartError:
        return EngineStartError(
            f"engine '{self.name}' {what}. Last lines of its log {self.log_path}:\n{log_tail(self.log_path)}"
        )

    def _wait_ready(self, timeout_s: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if self._conn.poll(POLL_S):
                    kind, _, payload = self._conn.recv()
                    if kind == "ready":
                        info: dict[str, Any] = payload
                        return info
                    raise self._start_error(f"failed to start ({payload})")
            except (EOFError, OSError):
                pass  # the worker died; reported below
            if not self.process.is_alive():
                raise self._start_error(f"worker exited with code {self.process.exitcode} while starting")
        raise self._start_error(
            f"did not start within {self._start_timeout_s:.0f} s (set MOA_LOCAL_ENGINE_START_TIMEOUT to wait longer)"
        )

    # -- calls ------------------------------------------------------------------------------------------------

    def is_alive(self) -> bool:
        return self._ready and not self._closed and self._dead is None and self.process.is_alive()

    def _open_call(self, op: str, payload: Any) -> tuple[int, queue.Queue[tuple[str, Any]]]:
        q: queue.Queue[tuple[str, Any]] = queue.Queue()
        return self.send_call(op, payload, q.put), q

    def send_call(self, op: str, payload: Any, sink: Callable[[tuple[str, Any]], None]) -> int:
        """Send one call whose replies go to ``sink((kind, payload))``, called from the reader thread: ("delta",
        piece)..., then ("result", payload) or ("error", text); ("died", reason) if the worker dies or is closed
        first. Returns the call id (for ``cancel``). Raises EngineDiedError when the worker cannot take calls."""
        if self._dead is not None or self._closed or not self._ready:
            state = (f"died earlier ({self._dead})" if self._dead is not None
                     else "is closed" if self._closed else "has not finished starting")
            raise EngineDiedError(f"engine '{self.name}' {state}; its requests cannot run. Its log: {self.log_path}")
        with self._calls_lock:
            call_id = self._next_id
            self._next_id += 1
            self._calls[call_id] = sink
        try:
            with self._send_lock:
                self._conn.send((op, call_id, payload))
        except (OSError, ValueError) as exc:
            self._forget(call_id)
            self._died(f"could not send to the worker: {exc}")
            raise EngineDiedError(f"engine '{self.name}' died: {self._dead}") from exc
        return call_id

    def cancel(self, call_id: int, *, abort_op: str = "abort") -> None:
        """Forget call ``call_id`` (no more replies reach its sink) and ask the worker to abort it."""
        self._forget(call_id)
        if self.is_alive():
            with contextlib.suppress(OSError, ValueError), self._send_lock:
                self._conn.send((abort_op, call_id, None))

    def _forget(self, call_id: int) -> None:
        with self._calls_lock:
            self._calls.pop(call_id, None)

    def _next(self, q: queue.Queue[tuple[str, Any]]) -> tuple[str, Any]:
        while True:
            try:
                kind, payload = q.get(timeout=POLL_S)
            except queue.Empty:
                if self._dead is None and self.process.is_alive():
                    continue
                self._died(self._dead or f"worker exited with code {self.process.exitcode}")
                kind, payload = "died", self._dead
            if kind == "died":
                raise EngineDiedError(f"engine '{self.name}' died: {payload}. Its log: {self.log_path}")
            if kind == "error":
                raise EngineError(f"engine '{self.name}': {payload}")
            return kind, payload

    def call(self, op: str, payload: Any) -> Any:
        """Send one call and wait for its result. Raises EngineDiedError if the worker dies meanwhile."""
        call_id, q = self._open_call(op, payload)
        try:
            while True:
                kind, result = self._next(q)
                if kind == "result":
                    return result
        finally:
            self._forget(call_id)

    def stream_call(self, op: str, payload: Any, *, abort_op: str = "abort") -> Iterator[tuple[str, Any]]:
        """Send one call and yield its ("delta", piece) replies, then ("result", payload). Closing the iterator
        early sends ``abort_op`` for the call."""
        call_id, q = self._open_call(op, payload)
        finished = False
        try:
            while True:
                kind, result = self._next(q)
                yield kind, result
                if kind == "result":
                    finished = True
                    return
        finally:
            self._forget(call_id)
            if not finished and self.is_alive():
                with contextlib.suppress(OSError, ValueError), self._send_lock:
                    self._conn.send((abort_op, call_id, None))

    # -- the reader thread ------------------------------------------------------------------------------------

    def _read_loop(self) -> None:
        while not self._closed:
            try:
                if not self._conn.poll(POLL_S):
                    if not self.process.is_alive():
                        self._died(f"worker exited with code {self.process.exitcode}")
                        return
                    continue
                kind, call_id, payload = self._conn.recv()
            except (EOFError, OSError):
                if not self._closed:
                    self.process.join(POLL_S)
                    self._died(f"worker pipe closed (exit code {self.process.exitcode})")
                return
            if kind == "fatal":
                self._died(f"worker failed: {payload}")
                return
            with self._calls_lock:
                sink = self._calls.get(call_id)
                if kind in ("result", "error"):  # the call is over: later replies (none are sent) go nowhere
                    self._calls.pop(call_id, None)
            if sink is not None:
                sink((kind, payload))

    def _died(self, reason: str) -> None:
        """Record death, fail every call in flight, and kill what is left of the process group."""
        if self._dead is None:
            self._dead = reason
        self._kill_group()
        with self._calls_lock:
            pending = list(self._calls.values())
            self._calls.clear()
        for sink in pending:
            sink(("died", self._dead))

    # -- shutdown ---------------------------------------------------------------------------------------------

    def _signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pgid, sig)

    def _kill_group(self) -> None:
        self._signal_group(signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(self.pid, signal.SIGKILL)  # in case it died before setsid()
        self.process.join(5.0)

    def close(self, *, grace_s: float = 10.0) -> None:
        """Ask the worker to stop, wait ``grace_s``, then terminate and kill its whole process group. Idempotent."""
        if self._closed:
            return
        self._closed = True
        _LIVE.discard(self)
        if self.process.is_alive():
            with contextlib.suppress(OSError, ValueError), self._send_lock:
                self._conn.send(("shutdown", 0, None))
            self.process.join(grace_s)
        if self.process.is_alive():
            self._signal_group(signal.SIGTERM)
            self.process.join(3.0)
        # SIGKILL whatever is left in the group (an EngineCore that outlived its parent, executor workers).
        self._kill_group()
        deadline = time.monotonic() + 5.0
        while group_pids(self.pgid) and time.monotonic() < deadline:
            self._signal_group(signal.SIGKILL)
            time.sleep(0.05)
        with self._calls_lock:
            pending = list(self._calls.values())
            self._calls.clear()
        for sink in pending:
            sink(("died", "engine closed"))
        self._conn.close()

    def pids(self) -> list[int]:
        """The live processes of this worker's tree (the worker and everything it started)."""
        return group_pids(self.pgid)


# -- a host for tests of the process machinery (no model) -----------------------------------------------------------


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
