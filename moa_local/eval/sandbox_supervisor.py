"""Supervises sandboxed checks: starts each one's jail, runs the trusted test against the jailed function, kills every
process the jail started and prints the verdict. The verdict is decided here, outside the jail.

Runs as ``python -I -S sandbox_supervisor.py EVALUATOR_PID UID`` (standard library only), one per evaluator worker,
started by moa_local.eval.sandbox: reads one JSON spec per line on stdin and prints one JSON line ``{"nonce",
"status", "detail"}`` per check, each check in a fresh jail. It never runs untrusted code itself: the module runs in
the jail (sandbox_jail.py) and only plain values come back, which the test compares here. It is a child subreaper, so
every process a jail starts stays its descendant (``setsid`` and double forks included) and is killed at the end of
the check; it is not dumpable, so a jail running as the same user cannot read its memory or open its descriptors.
It knows nothing about suites, models or how the evaluator chose the isolation: the spec says what to run.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import itertools
import json
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_CHILD_SUBREAPER = 1, 4, 36
_libc = ctypes.CDLL(None, use_errno=True)

_spec = importlib.util.spec_from_file_location("moa_sandbox_jail", os.path.join(os.path.dirname(__file__), "sandbox_jail.py"))
assert _spec is not None and _spec.loader is not None
codec: Any = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(codec)


class TimedOut(BaseException):
    """The deadline passed. A BaseException, so a test's ``except Exception`` cannot swallow it."""


class JailGone(BaseException):
    """The jail closed its reply pipe or sent something that is not a message: the check cannot go on."""


class Raised(Exception):
    """The jailed function (or module) raised; ``str()`` names the exception and its message."""


class Channel:
    """Newline-delimited JSON to and from the jail, every read and write bounded by the deadline and the line cap."""

    def __init__(self, send_fd: int, receive_fd: int, deadline: float) -> None:
        self.send_fd, self.receive_fd, self.deadline = send_fd, receive_fd, deadline
        os.set_blocking(send_fd, False)
        self.buffer = b""

    def _wait(self, fd: int, *, write: bool) -> None:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimedOut
        ready = select.select([], [fd], [], left) if write else select.select([fd], [], [], left)
        if not any(ready):
            raise TimedOut

    def send(self, message: dict[str, Any]) -> None:
        data = codec.dumps(message)
        while data:
            self._wait(self.send_fd, write=True)
            try:
                data = data[os.write(self.send_fd, data):]
            except BlockingIOError:
                continue
            except BrokenPipeError as exc:
                raise JailGone("the program's process closed its input") from exc

    def close(self) -> None:
        for fd in (self.send_fd, self.receive_fd):
            with contextlib.suppress(OSError):
                os.close(fd)

    def receive(self) -> dict[str, Any]:
        while b"\n" not in self.buffer:
            if len(self.buffer) > codec.MAX_LINE:
                raise JailGone(f"a reply longer than {codec.MAX_LINE >> 20} MiB")
            self._wait(self.receive_fd, write=False)
            chunk = os.read(self.receive_fd, 1 << 16)
            if not chunk:
                raise JailGone("the program's process ended without answering")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        try:
            message = json.loads(line)
        except (ValueError, RecursionError) as exc:
            raise JailGone("the program's process sent something that is not a reply") from exc
        if type(message) is not dict:
            raise JailGone("the program's process sent something that is not a reply")
        return message


def _raised(reply: dict[str, Any]) -> Raised:
    return Raised(f"{str(reply.get('raised'))[:80]}: {str(reply.get('message'))[:300]}")


def _all_children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as fh:
                    stat = fh.read()
            except OSError:
                continue
            ppid = int(stat[stat.rindex(b")") + 2:].split()[1])
            children.setdefault(ppid, []).append(int(name))
    return children


def descendants() -> list[int]:
    """Every process below this one. As a child subreaper this process inherits all orphans of the tree, so the
    list includes processes that called ``setsid`` or whose parent died."""
    children, found, todo = _all_children(), [], [os.getpid()]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _rss_bytes(pids: list[int]) -> int:
    total, page = 0, os.sysconf("SC_PAGE_SIZE")
    for pid in pids:
        with contextlib.suppress(OSError, ValueError, IndexError), open(f"/proc/{pid}/statm", "rb") as fh:
            total += int(fh.read().split()[1]) * page
    return total


class Cgroups:
    """One fresh cgroup per check under each usable base (memory and pids limits on the whole tree), if any."""

    def __init__(self, bases: list[dict[str, Any]], *, memory_bytes: int, processes: int) -> None:
        self.groups: list[dict[str, Any]] = []
        for base in bases:
            path = os.path.join(base["path"], f"moa-sandbox-{os.getpid()}-{next(_serial)}")
            os.mkdir(path)
            group = {**base, "base": base["path"], "path": path}
            self.groups.append(group)
            v2 = base["version"] == 2
            if "memory" in base["controllers"]:
                self._write(path, "memory.max" if v2 else "memory.limit_in_bytes", memory_bytes)
                self._write(path, "memory.swap.max" if v2 else "memory.memsw.limit_in_bytes", 0 if v2 else memory_bytes,
                            optional=True)
            if "pids" in base["controllers"]:
                self._write(path, "pids.max", processes)

    @staticmethod
    def _write(path: str, name: str, value: int | str, *, optional: bool = False) -> None:
        try:
            with open(os.path.join(path, name), "w") as fh:
                fh.write(str(value))
        except OSError:
            if not optional:
                raise

    @property
    def limits_memory(self) -> bool:
        return any("memory" in g["controllers"] for g in self.groups)

    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        """This process sits in the check's groups while it starts the jail, so the whole tree is born inside them
        (cgroup membership is inherited at fork); it moves back to its own groups at once."""
        for group in self.groups:
            self._write(group["path"], "cgroup.procs", os.getpid())
        try:
            yield
        finally:
            for group in self.groups:
                self._write(group["base"], "cgroup.procs", os.getpid())

    def members(self) -> set[int]:
        pids: set[int] = set()
        for group in self.groups:
            with contextlib.suppress(OSError, ValueError), open(os.path.join(group["path"], "cgroup.procs")) as fh:
                pids.update(int(p) for p in fh.read().split())
        return pids

    def kill(self) -> None:
        for group in self.groups:
            if group["version"] == 2:
                self._write(group["path"], "cgroup.kill", 1, optional=True)

    def events(self) -> list[str]:
        """Which limits the tree hit: 'memory', 'processes'."""
        hit = []
        for group in self.groups:
            for name, key, label in (("memory.events", "oom_kill", "memory"), ("memory.oom_control", "oom_kill", "memory"),
                                     ("pids.events", "max", "processes")):
                with contextlib.suppress(OSError, ValueError), open(os.path.join(group["path"], name)) as fh:
                    counts = dict(line.split()[:2] for line in fh if len(line.split()) >= 2)
                    if int(counts.get(key, 0)) > 0 and label not in hit:
                        hit.append(label)
        return hit

    def remove(self) -> None:
        """Remove the (now empty) groups; one the kernel still holds is retried before later checks and at exit."""
        _leftover_groups.extend(group["path"] for group in self.groups)
        remove_leftover_groups(wait_s=0.5)


_serial = itertools.count()
_leftover_groups: list[str] = []


def remove_leftover_groups(*, wait_s: float) -> None:
    deadline = time.monotonic() + wait_s
    while _leftover_groups:
        for path in list(_leftover_groups):
            try:
                os.rmdir(path)
                _leftover_groups.remove(path)
            except FileNotFoundError:
                _leftover_groups.remove(path)
            except OSError:
                pass
        if not _leftover_groups or time.monotonic() > deadline:
            return
        time.sleep(0.01)


class Check:
    """One check, from start to verdict. ``run()`` never raises: every way a check can end is a verdict."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.deadline = time.monotonic() + spec["timeout_s"]
        self.memory_hit = False
        self.done = False
        self.proc: subprocess.Popen[bytes] | None = None
        self.exit_statuses: dict[int, int] = {}

    def run(self) -> dict[str, str]:
        # 1. Files for the jail's stdout and stderr, outside anything it can see; read back through our own fds.
        private = tempfile.mkdtemp(prefix="moa-sandbox-")
        out = open(os.path.join(private, "stdout"), "w+b")  # noqa: SIM115 - closed below
        err = open(os.path.join(private, "stderr"), "w+b")  # noqa: SIM115
        work = cgroups = channel = None
        try:
            # 2. The limits on the whole tree, when a cgroup is writable here.
            cgroups = Cgroups(self.spec["cgroups"], memory_bytes=self.spec["memory_bytes"],
                              processes=self.spec["processes"])
            # 3. Its own folder (the rlimits fallback; bubblewrap gives it a private tmpfs instead).
            if self.spec["own_folder"]:
                work = tempfile.mkdtemp(prefix="moa-sandbox-work-", dir=self.spec["work_parent"])
                if self.spec["jail"].get("uid") is not None:
                    os.chown(work, self.spec["jail"]["uid"], self.spec["jail"]["gid"])
            signal.setitimer(signal.ITIMER_REAL, max(0.001, self.deadline - time.monotonic()))
            channel = self._start(cgroups, work, out, err)
            if not cgroups.limits_memory:
                threading.Thread(target=self._watch_memory, daemon=True).start()
            verdict = self._check(channel)
        except TimedOut:
            verdict = {"status": "timed out", "detail": f"no verdict within {self.spec['timeout_s']:g} s"}
        except JailGone as exc:
            verdict = {"status": "failed", "detail": str(exc)}
        except BaseException as exc:  # noqa: BLE001 - the supervisor's own failure is still a verdict
            verdict = {"status": "failed", "detail": f"sandbox error: {type(exc).__name__}: {exc}"[:300]}
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            self.done = True
            self._kill_tree(cgroups)
        if verdict["status"] == "failed":
            verdict["detail"] = self._explain(verdict["detail"], cgroups, err)
        if channel is not None:
            channel.close()
        out.close()
        err.close()
        if cgroups is not None:
            cgroups.remove()
        shutil.rmtree(private, ignore_errors=True)
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
        return verdict

    def _start(self, cgroups: Cgroups, work: str | None, out: Any, err: Any) -> Channel:
        """Start the jail inside the check's cgroups and send it the module."""
        to_jail_r, to_jail_w = os.pipe()
        from_jail_r, from_jail_w = os.pipe()
        jail = {**self.spec["jail"], "request_fd": to_jail_r, "reply_fd": from_jail_w}
        env = {**self.spec["env"], "HOME": work, "TMPDIR": work} if work else self.spec["env"]
        try:
            with cgroups.entered():
                self.proc = subprocess.Popen([*self.spec["argv"], json.dumps(jail)], stdin=subprocess.DEVNULL,
                                             stdout=out, stderr=err, cwd=work or "/", env=env,
                                             pass_fds=(to_jail_r, from_jail_w), start_new_session=True)
        finally:
            os.close(to_jail_r)
            os.close(from_jail_w)
        channel = Channel(to_jail_w, from_jail_r, self.deadline)
        channel.send({"source": self.spec["source"], "entry_point": self.spec["entry_point"]})
        return channel

    def _check(self, channel: Channel) -> dict[str, str]:
        """Wait for the module to load, then run the trusted test with the jailed function as its candidate."""
        try:
            first = channel.receive()
        except JailGone as exc:
            return {"status": "failed", "detail": str(exc)}
        if first.get("ready") is not True:
            return {"status": "failed", "detail": f"the program raised {_raised(first)}" if "raised" in first
                    else "the program's process sent something that is not a reply"}

        def candidate(*args: Any, **kwargs: Any) -> Any:
            if kwargs:
                raise TypeError("keyword arguments are not passed into the sandbox")
            channel.send({"args": codec.encode(list(args))})
            reply = channel.receive()
            if "value" not in reply:
                if "raised" not in reply:
                    raise JailGone("the program's process sent something that is not a reply")
                raise _raised(reply)
            try:
                return codec.decode(reply["value"])
            except (codec.CodecError, ValueError, RecursionError) as exc:
                raise JailGone(f"the function returned something that is not a plain value ({exc})") from exc

        random.seed(0)  # tests that draw inputs draw the same ones every time
        namespace: dict[str, Any] = {"__name__": "moa_sandbox_check"}
        exec(compile(self.spec["setup"], "<setup>", "exec"), namespace)
        namespace[self.spec["entry_point"]] = candidate  # tests that call the function by name get the jailed one
        exec(compile(self.spec["test"], "<test>", "exec"), namespace)
        try:
            namespace["check"](candidate)
        except JailGone as exc:
            return {"status": "failed", "detail": str(exc)}
        except Raised as exc:
            return {"status": "failed", "detail": f"the function raised {exc}"}
        except Exception as exc:  # noqa: BLE001 - an assertion or error in the trusted test is a failed check
            return {"status": "failed", "detail": self._where(exc)}
        return {"status": "passed", "detail": ""}

    def _where(self, exc: Exception) -> str:
        import traceback

        frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == "<test>" and f.lineno]
        lines = self.spec["test"].splitlines()
        where = f" at `{lines[frames[-1].lineno - 1].strip()[:200]}`" if frames else ""  # type: ignore[operator]
        message = f": {str(exc)[:200]}" if str(exc) else ""
        return f"{type(exc).__name__}{message}{where}"

    def _watch_memory(self) -> None:
        """Without a memory cgroup: sum the tree's resident memory every 0.1 s and kill the tree over the limit."""
        while not self.done:
            time.sleep(0.1)
            if not self.done and _rss_bytes(descendants()) > self.spec["memory_bytes"]:
                self.memory_hit = True
                self._kill_tree(None)
                return

    def _kill_tree(self, cgroups: Cgroups | None) -> None:
        """SIGKILL every process of the check's cgroups and every descendant until none is left, reaping as we go.
        With a cgroup its member list is complete and cheap to read; the scan of /proc runs once more at the end
        unless the jail ran as another user, who cannot leave the group."""
        scan = cgroups is None or not cgroups.groups
        for _ in range(500):
            if cgroups is not None:
                cgroups.kill()
            pids = (set(descendants()) if scan else set()) | (cgroups.members() if cgroups is not None else set())
            if not pids:
                if scan or self.spec["jail"].get("uid") is not None:
                    return
                scan = True
                continue
            for pid in pids:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.001)
            self._reap()
        self._reap()

    def _reap(self) -> None:
        """Collect every dead child (the orphans this subreaper adopted included), keeping their exit statuses."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.exit_statuses[pid] = status

    def _exit_code(self) -> int | None:
        """The jail's first process's exit code (negative: the signal that killed it), if it has ended."""
        if self.proc is None:
            return None
        if self.proc.pid in self.exit_statuses:
            return os.waitstatus_to_exitcode(self.exit_statuses[self.proc.pid])
        return self.proc.poll()

    def _explain(self, detail: str, cgroups: Cgroups | None, err: Any) -> str:
        """Add what ended the jail's process: a limit of the tree, a signal, its last line of stderr."""
        hit = (cgroups.events() if cgroups is not None else []) + (["memory"] if self.memory_hit else [])
        notes = [f"the {label} limit of the whole process tree was reached" for label in hit]
        ended = "ended without" in detail or "did not start" in detail
        code = self._exit_code()
        if code is not None and code < 0 and ended:
            notes.append(f"killed by {signal.Signals(-code).name}")
        err.flush()
        size = os.fstat(err.fileno()).st_size
        tail = os.pread(err.fileno(), 2048, max(0, size - 2048)).decode("utf-8", "replace").strip().splitlines()
        if tail and ended:
            notes.append(tail[-1].strip()[:200])
        return "; ".join([detail, *notes])[:500]


def _alarm(signum: int, frame: Any) -> None:
    raise TimedOut


def _kill_uid(uid: int) -> None:
    """Kill every process of ``uid``: what a killed supervisor of this uid slot may have left behind (root only)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child never returns
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            os.kill(-1, signal.SIGKILL)  # every process this uid may signal: exactly that uid's own
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


def main() -> None:
    """Serve checks one at a time: a JSON spec per line on stdin, a JSON verdict per line on stdout, until EOF.
    argv: the evaluator's pid, and the uid its jails run as (``-`` when not root)."""
    _libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL))
    if os.getppid() != int(sys.argv[1]):
        return  # the evaluator died before the line above
    _libc.prctl(PR_SET_DUMPABLE, 0)
    _libc.prctl(PR_SET_CHILD_SUBREAPER, 1)
    if sys.argv[2] != "-":
        _kill_uid(int(sys.argv[2]))
    signal.signal(signal.SIGALRM, _alarm)
    for line in sys.stdin:
        spec = json.loads(line)
        verdict = Check(spec).run()
        sys.stdout.write(json.dumps({"nonce": spec["nonce"], **verdict}) + "\n")
        sys.stdout.flush()
    remove_leftover_groups(wait_s=5)


if __name__ == "__main__":
    main()
