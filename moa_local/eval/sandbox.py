"""Runs model-written code so that it can neither harm the machine nor forge its own verdict (the HumanEval sandbox).

A check is an untrusted module, the name of one of its functions, and a trusted test (``check(candidate)``). A
supervisor process per worker (sandbox_supervisor.py) starts each module in a fresh jail (sandbox_jail.py), runs the
test *outside* the jail with a stand-in for the function that forwards each call into the jail, and decides the
verdict from the values that come back (exact builtin types only). So the code cannot print a verdict, exit early
with a good status, or return an object that equals everything.

Two isolation modes, chosen once per process (``isolation: auto`` tries the first and falls back with a one-line
notice; docs/eval.md tabulates what each confines):

* ``bubblewrap`` (the ``bwrap`` tool; `apt-get install bubblewrap`): new PID, network, IPC and UTS namespaces, a
  root made of read-only binds of the system and the interpreter's prefix only (no /etc, /home, /tmp, project or
  venv), a private size-limited tmpfs as its only writable folder, its own /proc, killed with its parent. As root it
  runs as a dedicated unprivileged uid; otherwise as the caller in a new user namespace.
* ``rlimits`` (fallback): a plain child, as a dedicated uid when the evaluator is root, in a folder of its own.

Both modes: per-process limits (address space, CPU, file size, open files), a process limit that covers the whole
tree (a dedicated uid or user namespace), a memory limit on the whole tree (a cgroup when one is writable, else
sampled every 0.1 s), no new user namespaces (seccomp), every descendant killed at the end (the supervisor is a
child subreaper), and any way a check can end (a deleted folder or output, a dead process, garbage on its pipe) is a
failed item, never an exception. Knows nothing about suites or models; never runs the checked code in this process.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import queue
import secrets
import select
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from moa_local.errors import ConfigError

Isolation = Literal["auto", "bubblewrap", "rlimits"]
UID_BASE = 2_147_000_000  # root only: check N runs as uid/gid UID_BASE + slot, a range no account uses
UID_SLOTS = 64
_HERE = Path(__file__).resolve().parent
_JAIL = _HERE / "sandbox_jail.py"
_SUPERVISOR = _HERE / "sandbox_supervisor.py"
_JAIL_INSIDE = "/moa/sandbox_jail.py"
_SYSTEM_DIRS = ("/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin")


def _isolation_from_env() -> Isolation:
    value = os.environ.get("MOA_LOCAL_SANDBOX", "auto")
    if value not in ("auto", "bubblewrap", "rlimits"):
        raise ConfigError(f"MOA_LOCAL_SANDBOX must be auto, bubblewrap or rlimits, got '{value}'")
    return value  # type: ignore[return-value]


class SandboxConfig(BaseModel):
    """Limits and isolation of one check. Every limit holds for the whole process tree unless it says otherwise."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    isolation: Isolation = Field(
        default_factory=_isolation_from_env,
        description="auto: bubblewrap when it works here, else rlimits with a one-line notice; bubblewrap: refuse to "
        "run without it; rlimits: never use it. Default from $MOA_LOCAL_SANDBOX, else auto.",
    )
    timeout_s: float = Field(10.0, gt=0, description="Wall-clock seconds for loading the module and the whole test.")
    memory_mb: int = Field(1024, ge=64, description="Memory of the whole tree (cgroup, else sampled) and the address "
                           "space of each process.")
    processes: int = Field(32, ge=4, description="Processes (and threads) of the whole tree.")
    output_kb: int = Field(1024, ge=16, description="Largest file any process may write (its stdout and stderr "
                           "included); a larger write kills it.")
    open_files: int = Field(64, ge=16, description="Open files per process.")
    folder_mb: int = Field(64, ge=1, description="Size of its own writable folder (bubblewrap; the fallback's folder "
                           "is on disk and bounded per file only).")


@dataclass(frozen=True)
class Check:
    """One test of one function: ``source`` is untrusted and runs jailed; ``setup`` (helpers the test uses) and
    ``test`` (which defines ``check(candidate)``) are trusted and run in the supervisor."""

    source: str
    entry_point: str
    test: str
    setup: str = ""


@dataclass(frozen=True)
class Outcome:
    """How one check ended: ``passed`` only when the trusted test ran to its end."""

    passed: bool
    status: str  # passed | failed | timed out
    detail: str = ""


@dataclass(frozen=True)
class Machine:
    """What this machine allows, probed once per process and isolation setting."""

    mode: Literal["bubblewrap", "rlimits"]
    python: str  # the interpreter the jail runs
    python_dirs: tuple[str, ...]  # what it needs to see
    bwrap: str | None
    as_root: bool
    cgroups: tuple[tuple[int, str, str], ...]  # (version, controllers, base folder) usable for per-check groups
    fallback_reason: str = ""

    @property
    def limits_memory(self) -> bool:
        return any("memory" in controllers for _, controllers, _ in self.cgroups)

    def notice(self) -> str | None:
        """One line saying what is *not* confined here, or None when nothing the mode promises is missing."""
        gaps = []
        if self.mode == "rlimits":
            gaps.append("the network, world-readable files, world-writable folders (/tmp, /dev/shm) and other "
                        "processes' command lines are within its reach")
            if not self.as_root:
                gaps.append("it runs as you, so it can read your files and signal or trace your processes")
        if not self.limits_memory:
            gaps.append("the whole-tree memory limit is sampled every 0.1 s (no writable cgroup)")
        if not gaps:
            return None
        why = f" ({self.fallback_reason})" if self.fallback_reason else ""
        fix = "; install bubblewrap to confine it" if self.mode == "rlimits" else ""
        return f"moa-local: HumanEval sandbox in {self.mode} mode{why}: " + "; ".join(gaps) + fix + "."


def _interpreter_dirs(python: str) -> tuple[str, ...]:
    """The folders an interpreter needs: its prefix (stdlib, shared library) and where its binary lives."""
    out = subprocess.run([python, "-I", "-S", "-c", "import sys, os; print(sys.base_prefix); print(sys.base_exec_prefix);"
                          "print(os.path.dirname(os.path.realpath(sys.executable)))"],
                         capture_output=True, text=True, timeout=30, check=True)
    dirs = {os.path.realpath(line) for line in out.stdout.split() if line}
    outside = [d for d in dirs if not any(d == s or d.startswith(s + "/") for s in _SYSTEM_DIRS)]
    return tuple(sorted(d for d in outside if not any(d.startswith(o + "/") for o in outside)))


def _open_to_others(path: str) -> bool:
    """Whether an unrelated user can reach ``path`` (every folder above it searchable by others)."""
    parts = Path(path).resolve().parts
    for i in range(1, len(parts) + 1):
        mode = os.stat(os.path.join(*parts[:i])).st_mode
        if stat.S_ISDIR(mode) and not mode & stat.S_IXOTH:
            return False
    return True


def _jail_python(as_root: bool) -> str:
    """The evaluator's own interpreter, or (as root without bubblewrap) one the unprivileged uid can reach."""
    base = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
    if not as_root:
        return base
    for candidate in (base, "/usr/bin/python3", "/usr/local/bin/python3"):
        if os.path.exists(candidate) and _open_to_others(candidate) and all(
            _open_to_others(d) for d in (*_interpreter_dirs(candidate), os.path.dirname(os.path.realpath(candidate)))
        ):
            return os.path.realpath(candidate)
    raise ConfigError(
        f"the HumanEval sandbox runs code as an unprivileged user, who cannot reach {base} or any system python3. "
        "Install bubblewrap (apt-get install bubblewrap) or a system python3 (apt-get install python3)"
    )


def bwrap_argv(machine: Machine, *, folder_bytes: int) -> list[str]:
    """The bubblewrap command line that wraps the jail (everything up to the interpreter)."""
    assert machine.bwrap is not None
    argv = [machine.bwrap, "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try",
            "--die-with-parent", "--new-session", "--cap-drop", "ALL"]
    # As root: no user namespace (it would map the jail to root outside); the jail drops to its uid itself.
    argv += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"] if machine.as_root else ["--unshare-user", "--disable-userns"]
    for path in _SYSTEM_DIRS:
        if os.path.islink(path):
            argv += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            argv += ["--ro-bind", path, path]
    made: set[str] = set()
    for path in (*machine.python_dirs, _JAIL_INSIDE):
        # bwrap would create the folders above a bind 0700; the unprivileged uid must be able to pass through them
        for parent in reversed([str(p) for p in Path(path).parents if str(p) != "/"]):
            if parent not in made:
                argv += ["--perms", "0755", "--dir", parent]
                made.add(parent)
    for path in machine.python_dirs:
        argv += ["--ro-bind", path, path]
    argv += ["--ro-bind", str(_JAIL), _JAIL_INSIDE,
             "--proc", "/proc", "--dev", "/dev", "--size", str(folder_bytes), "--perms", "0777", "--tmpfs", "/work",
             "--chdir", "/work", "--remount-ro", "/dev", "--remount-ro", "/", "--clearenv"]
    for key, value in _env("/work").items():
        argv += ["--setenv", key, value]
    return [*argv, "--", machine.python]


def _env(home: str) -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8"}


def _cgroups() -> tuple[tuple[int, str, str], ...]:
    """Cgroups under this process's own that can hold one child group per check, with memory and pids limits.
    cgroup v2 only where those controllers are already enabled below us (delegated); v1 where the folder is
    writable. Never changes a cgroup it did not create."""
    found: list[tuple[int, str, str]] = []
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return ()
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            for mount in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified"):
                base = mount + path.rstrip("/")
                with contextlib.suppress(OSError):
                    enabled = set(Path(base, "cgroup.subtree_control").read_text().split()) & {"memory", "pids"}
                    if enabled and Path(mount, "cgroup.controllers").exists():
                        found.append((2, ",".join(sorted(enabled)), base))
                        break
        else:
            names = [name for name in ("memory", "pids") if name in controllers.split(",")]
            if names:
                found.append((1, ",".join(names), f"/sys/fs/cgroup/{controllers}{path.rstrip('/')}"))
    usable = []
    for version, controllers, base in found:
        _sweep(base)
        probe = os.path.join(base, f"moa-sandbox-probe-{os.getpid()}")
        try:
            os.mkdir(probe)
            os.rmdir(probe)
            usable.append((version, controllers, base))
        except OSError:
            continue
    return tuple(usable)


def _sweep(base: str) -> None:
    """Remove empty per-check groups left by supervisors that were killed (their pid is in the name)."""
    with contextlib.suppress(OSError):
        for entry in os.scandir(base):
            pid = entry.name.removeprefix("moa-sandbox-").split("-")[0]
            if entry.is_dir() and pid.isdigit() and not Path(f"/proc/{pid}").exists():
                with contextlib.suppress(OSError):
                    os.rmdir(entry.path)


@lru_cache(maxsize=4)
def probe(isolation: str) -> Machine:
    """What this machine allows for ``isolation``: bubblewrap if requested or auto and a trial jail works."""
    as_root = os.geteuid() == 0
    cgroups = _cgroups()
    reason = ""
    if isolation in ("auto", "bubblewrap"):
        bwrap = shutil.which("bwrap")
        if bwrap is None:
            reason = "bwrap not found"
        else:
            python = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
            machine = Machine("bubblewrap", python, _interpreter_dirs(python), bwrap, as_root, cgroups)
            drop = f"os.setgroups([]); os.setgid({UID_BASE}); os.setuid({UID_BASE}); " if as_root else ""
            try:
                out = subprocess.run([*bwrap_argv(machine, folder_bytes=1 << 20), "-I", "-S", "-c",
                                      f"import os; {drop}print('jail', os.getuid())"],
                                     capture_output=True, text=True, timeout=30)
                if out.returncode == 0 and out.stdout.startswith("jail"):
                    return machine
                reason = f"bwrap failed here: {(out.stderr.strip().splitlines() or ['exit ' + str(out.returncode)])[-1]}"
            except (OSError, subprocess.SubprocessError) as exc:
                reason = f"bwrap failed here: {exc}"
        if isolation == "bubblewrap":
            raise ConfigError(f"the HumanEval sandbox was asked for bubblewrap isolation, but {reason}. Install it "
                              "(apt-get install bubblewrap) or set MOA_LOCAL_SANDBOX=auto")
    python = _jail_python(as_root)
    return Machine("rlimits", python, _interpreter_dirs(python), None, as_root, cgroups, reason)


_noticed: set[str] = set()
_notice_lock = threading.Lock()


def machine_for(config: SandboxConfig) -> Machine:
    """The probed machine for ``config``, printing its notice once per process."""
    machine = probe(config.isolation)
    line = machine.notice()
    with _notice_lock:
        if line and line not in _noticed:
            _noticed.add(line)
            print(line, file=sys.stderr)
    return machine


class _UidSlot:
    """As root: a uid no other running supervisor (of any evaluator on this machine) is using, held by a lock file
    for the supervisor's life. Not root: no uid of its own (None)."""

    def __init__(self, as_root: bool) -> None:
        self.uid: int | None = None
        self._fd: int | None = None
        if not as_root:
            return
        folder = Path("/run" if os.path.isdir("/run") else tempfile.gettempdir(), "moa-local-sandbox-uids")
        folder.mkdir(mode=0o700, exist_ok=True)
        info = folder.lstat()
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != 0 or info.st_mode & 0o022:
            raise ConfigError(f"{folder} must be a folder owned by root and writable by root only; remove it")
        while self.uid is None:
            for slot in range(UID_SLOTS):
                fd = os.open(folder / f"{slot}.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    os.close(fd)
                    continue
                self.uid, self._fd = UID_BASE + slot, fd
                break
            else:
                threading.Event().wait(0.05)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _work_parent() -> str:
    """Where the rlimits fallback makes each check's folder: the temp folder, if another user can reach it."""
    folder = tempfile.gettempdir()
    return folder if _open_to_others(folder) else "/tmp"


class Supervisor:
    """One supervisor process (sandbox_supervisor.py) that runs checks one after another, each in a fresh jail."""

    def __init__(self, machine: Machine) -> None:
        self.machine = machine
        self.slot = _UidSlot(machine.as_root)
        uid = "-" if self.slot.uid is None else str(self.slot.uid)
        # only a crashing supervisor writes to stderr (a pipe nobody reads could fill up); closed with this object
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115
        self.proc = subprocess.Popen([sys.executable, "-I", "-S", str(_SUPERVISOR), str(os.getpid()), uid],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
                                     start_new_session=True)
        self._stdout = b""

    def run(self, check: Check, config: SandboxConfig) -> Outcome:
        """The verdict on ``check``; a supervisor that does not answer in time is killed (and must be replaced)."""
        machine, uid, memory = self.machine, self.slot.uid, config.memory_mb << 20
        jail: dict[str, Any] = {
            "uid": uid, "gid": uid, "memory_bytes": memory, "cpu_s": max(1, int(config.timeout_s) + 1),
            "file_bytes": config.output_kb << 10, "open_files": config.open_files,
            "processes": config.processes,
            # a uid of its own (root) or a user namespace (bubblewrap) makes RLIMIT_NPROC the tree's own count
            "processes_relative": uid is None and machine.mode == "rlimits",
            "parent_death": machine.mode == "rlimits",
        }
        if machine.mode == "bubblewrap":
            argv = [*bwrap_argv(machine, folder_bytes=config.folder_mb << 20), "-I", "-S", _JAIL_INSIDE]
        else:
            argv = [machine.python, "-I", "-S", str(_JAIL)]
        nonce = secrets.token_hex(16)
        spec = {
            "nonce": nonce, "argv": argv, "jail": jail, "env": _env(""), "own_folder": machine.mode == "rlimits",
            "work_parent": _work_parent(),
            "timeout_s": config.timeout_s, "memory_bytes": memory, "processes": config.processes,
            "source": check.source, "entry_point": check.entry_point, "setup": check.setup, "test": check.test,
            "cgroups": [{"version": v, "controllers": c, "path": p} for v, c, p in machine.cgroups],
        }
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write(json.dumps(spec).encode() + b"\n")
            self.proc.stdin.flush()
        except OSError:
            return self._gone(nonce)
        line = self._read_line(time.monotonic() + config.timeout_s + 30)
        if line is None:
            return self._gone(nonce)
        return _verdict(line, nonce)

    def _read_line(self, deadline: float) -> bytes | None:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._stdout:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return None
            self._stdout += chunk
        line, self._stdout = self._stdout.split(b"\n", 1)
        return line

    def _gone(self, nonce: str) -> Outcome:
        self.close(kill=True)
        self._stderr.seek(0)
        err = self._stderr.read().decode("utf-8", "replace").strip().splitlines()
        return Outcome(False, "failed", f"the sandbox supervisor gave no verdict: {(err or ['no output'])[-1][:300]}")

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self, *, kill: bool = False) -> None:
        """End the supervisor (EOF on its input; SIGKILL when ``kill`` or when it does not end)."""
        if self.proc.poll() is None:
            if kill:
                self.proc.kill()
            else:
                with contextlib.suppress(OSError):
                    self.proc.stdin.close()  # type: ignore[union-attr]
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.slot.release()  # the next supervisor on this uid kills whatever a killed one left behind


def _verdict(line: bytes, nonce: str) -> Outcome:
    """The supervisor's verdict line, if it carries this check's nonce."""
    with contextlib.suppress(ValueError, TypeError, KeyError):
        verdict = json.loads(line)
        if verdict["nonce"] == nonce and verdict["status"] in ("passed", "failed", "timed out"):
            return Outcome(verdict["status"] == "passed", verdict["status"], str(verdict.get("detail", ""))[:500])
    return Outcome(False, "failed", "the sandbox supervisor answered something that is not a verdict")


def run_check(check: Check, *, config: SandboxConfig | None = None) -> Outcome:
    """Run ``check`` in a fresh jail and return its verdict. Never raises for anything the checked code does; a
    machine that cannot sandbox at all raises ConfigError, before any code runs."""
    return run_checks([check], config=config, workers=1)[0]


def run_checks(checks: Sequence[Check], *, config: SandboxConfig | None = None, workers: int = 2) -> list[Outcome]:
    """Run many checks, ``workers`` at a time (one supervisor each); outcomes keep the order of ``checks``."""
    config = config or SandboxConfig()
    machine = machine_for(config)
    if not checks:
        return []
    idle: queue.SimpleQueue[Supervisor] = queue.SimpleQueue()
    started = [Supervisor(machine) for _ in range(max(1, min(workers, len(checks))))]
    for supervisor in started:
        idle.put(supervisor)

    def one(check: Check) -> Outcome:
        supervisor = idle.get()
        try:
            outcome = supervisor.run(check, config)
            if not supervisor.alive:
                started.append(replacement := Supervisor(machine))
                supervisor = replacement
            return outcome
        finally:
            idle.put(supervisor)

    try:
        with ThreadPoolExecutor(max_workers=len(started)) as pool:
            return list(pool.map(one, checks))
    finally:
        for supervisor in started:
            supervisor.close()
