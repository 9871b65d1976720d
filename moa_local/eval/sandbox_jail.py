"""The first code of a sandboxed process: drops to the sandbox user, limits itself, loads the untrusted module and
answers calls to one of its functions over two pipes. Also the value codec that both sides of those pipes share.

Runs as ``python -I -S sandbox_jail.py SPEC`` inside the jail, where moa_local is not importable: standard library
only, and nothing here may trust what the module does after it starts. It never decides a verdict: it only returns
plain values (or the exception a call raised) to the supervisor, which runs the trusted test. Whatever the module
writes to the reply pipe is decoded by the supervisor as plain data and nothing else, so an object that claims to
equal everything, or a forged "passed", cannot leave this process.

Protocol (one JSON object per line): the supervisor sends ``{"source", "entry_point"}``, this process answers
``{"ready": true}`` once the module ran (or ``{"raised", "message"}`` if it did not), then each ``{"args": [...]}``
is answered with ``{"value": ...}`` or ``{"raised", "message"}``.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

MAX_DEPTH = 100
MAX_LINE = 8 << 20  # bytes in one message; a longer reply is a failed call

_TAGS = ("tuple", "dict", "set", "frozenset", "bytes", "complex")


class CodecError(ValueError):
    """A value that cannot cross the jail's boundary (not plain data, too deep, malformed)."""


def encode(value: Any, depth: int = 0) -> Any:
    """A JSON-ready form of a plain value. Only exact builtin types pass (``type(x) is int``, never a subclass), so
    no object with its own ``__eq__`` can cross."""
    if depth > MAX_DEPTH:
        raise CodecError(f"value nested deeper than {MAX_DEPTH} levels")
    kind = type(value)
    if value is None or kind is bool or kind is int or kind is float or kind is str:
        return value
    if kind is list:
        return [encode(v, depth + 1) for v in value]
    if kind is tuple or kind is set or kind is frozenset:
        return {kind.__name__: [encode(v, depth + 1) for v in value]}
    if kind is dict:
        return {"dict": [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in value.items()]}
    if kind is bytes:
        return {"bytes": value.hex()}
    if kind is complex:
        return {"complex": [value.real, value.imag]}
    raise CodecError(f"a value of type {kind.__name__} cannot leave the sandbox (only plain builtin values can)")


def decode(data: Any, depth: int = 0) -> Any:
    """The plain value ``encode`` described. Anything else is a CodecError: the other side is not trusted."""
    if depth > MAX_DEPTH:
        raise CodecError(f"value nested deeper than {MAX_DEPTH} levels")
    kind = type(data)
    if data is None or kind is bool or kind is int or kind is float or kind is str:
        return data
    if kind is list:
        return [decode(v, depth + 1) for v in data]
    if kind is dict and len(data) == 1:
        tag, items = next(iter(data.items()))
        if tag == "bytes" and type(items) is str:
            return bytes.fromhex(items)
        if tag in _TAGS and type(items) is list:
            inner = [decode(v, depth + 1) for v in items]
            try:
                if tag == "tuple":
                    return tuple(inner)
                if tag == "set":
                    return set(inner)
                if tag == "frozenset":
                    return frozenset(inner)
                if tag == "complex" and len(inner) == 2 and all(type(v) is float for v in inner):
                    return complex(inner[0], inner[1])
                if tag == "dict" and all(type(p) is list and len(p) == 2 for p in inner):
                    return {k: v for k, v in inner}
            except TypeError as exc:  # an unhashable set member or dict key
                raise CodecError(str(exc)) from exc
    raise CodecError(f"not a plain value: {str(data)[:80]}")


def dumps(message: dict[str, Any]) -> bytes:
    return (json.dumps(message, separators=(",", ":")) + "\n").encode()


def _limit_self(spec: dict[str, Any]) -> None:
    """1. The user (only when started as root): no groups, then the sandbox's own uid and gid, never root again.
    2. Limits on this process and everything it starts. 3. No new user namespaces (seccomp, where offered)."""
    import resource

    uid = spec.get("uid")
    if uid is not None:
        os.setgroups([])
        os.setgid(spec["gid"])
        os.setuid(uid)
        if os.getuid() == 0 or os.geteuid() == 0:
            raise SystemExit("sandbox: could not drop root")
    if spec.get("parent_death"):
        import ctypes
        import signal

        ctypes.CDLL(None).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG (cleared by the setuid above)
    limits = {
        resource.RLIMIT_AS: spec["memory_bytes"],
        resource.RLIMIT_CPU: spec["cpu_s"],
        resource.RLIMIT_FSIZE: spec["file_bytes"],
        resource.RLIMIT_NOFILE: spec["open_files"],
        resource.RLIMIT_CORE: 0,
    }
    if spec.get("processes"):
        # RLIMIT_NPROC counts every process of the uid: its own uid or user namespace makes that the tree; as the
        # caller's uid (rlimits fallback, not root) it can only cap what the tree adds to the caller's count
        extra = _tasks_of(os.getuid()) if spec.get("processes_relative") else 0
        limits[resource.RLIMIT_NPROC] = spec["processes"] + extra
    for which, value in limits.items():
        hard = resource.getrlimit(which)[1]
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        resource.setrlimit(which, (value, value))
    _deny_user_namespaces()


# Seccomp: refuse new user namespaces (unshare/clone with CLONE_NEWUSER; clone3, whose flags a filter cannot read, is
# answered ENOSYS so the C library falls back to clone), and any syscall of a foreign ABI (x32, i386 on x86_64).
# Without a user namespace the code cannot mount anything (a tmpfs would be memory the limits do not see).
_ARCH = {"x86_64": (0xC000003E, {"unshare": 272, "clone": 56, "clone3": 435}),
         "aarch64": (0xC00000B7, {"unshare": 97, "clone": 220, "clone3": 435})}


def _deny_user_namespaces() -> bool:
    import ctypes
    import platform
    import struct

    if platform.machine() not in _ARCH:
        return False
    arch, nr = _ARCH[platform.machine()]
    allow, deny, enosys = 0x7FFF0000, 0x00050000 | 1, 0x00050000 | 38  # RET_ALLOW, RET_ERRNO|EPERM, RET_ERRNO|ENOSYS
    ld, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06
    program = [
        (ld, 0, 0, 4),  # 0: arch
        (jeq, 1, 0, arch),  # 1: native ABI -> 3
        (ret, 0, 0, deny),  # 2
        (ld, 0, 0, 0),  # 3: syscall number
        (jge, 7, 0, 0x40000000 if arch == 0xC000003E else 0xFFFFFFFF),  # 4: x32 ABI -> 12
        (jeq, 3, 0, nr["unshare"]),  # 5: -> 9
        (jeq, 2, 0, nr["clone"]),  # 6: -> 9
        (jeq, 5, 0, nr["clone3"]),  # 7: -> 13
        (ret, 0, 0, allow),  # 8
        (ld, 0, 0, 16),  # 9: flags (first argument, low 32 bits)
        (jset, 1, 0, 0x10000000),  # 10: CLONE_NEWUSER -> 12
        (ret, 0, 0, allow),  # 11
        (ret, 0, 0, deny),  # 12
        (ret, 0, 0, enosys),  # 13
    ]
    code = b"".join(struct.pack("HBBI", *insn) for insn in program)
    buffer = ctypes.create_string_buffer(code, len(code))
    fprog = struct.pack("HxxxxxxP", len(program), ctypes.addressof(buffer))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
        return False
    return libc.prctl(22, 2, ctypes.c_char_p(fprog), 0, 0) == 0  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER


def _tasks_of(uid: int) -> int:
    """Processes and threads of ``uid`` on this machine (what RLIMIT_NPROC counts)."""
    count = 0
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/status") as fh:
                    fields = dict(line.split(":", 1) for line in fh if ":" in line)
                if int(fields["Uid"].split()[0]) == uid:
                    count += int(fields["Threads"])
            except (OSError, KeyError, ValueError):
                continue
    return count


def _reply(out: Any, message: dict[str, Any]) -> None:
    out.write(dumps(message))
    out.flush()


def _raised(exc: BaseException) -> dict[str, Any]:
    return {"raised": type(exc).__name__, "message": str(exc)[:300]}


def main() -> None:
    spec = json.loads(sys.argv[1])
    requests = os.fdopen(spec["request_fd"], "rb")
    replies = os.fdopen(spec["reply_fd"], "wb")
    _limit_self(spec)
    sys.argv = ["program.py"]
    first = json.loads(requests.readline(MAX_LINE))
    module: dict[str, Any] = {"__name__": "__main__", "__builtins__": __builtins__}
    # 3. The untrusted module runs here; from this line on nothing in this process can be trusted.
    try:
        exec(compile(first["source"], "program.py", "exec"), module)
    except BaseException as exc:  # noqa: BLE001 - a module may raise anything, SystemExit included
        _reply(replies, _raised(exc))
        return
    _reply(replies, {"ready": True})
    for line in iter(lambda: requests.readline(MAX_LINE), b""):
        try:
            function = module[first["entry_point"]]
            result = function(*decode(json.loads(line)["args"]))
            message = {"value": encode(result)}
        except BaseException as exc:  # noqa: BLE001
            message = _raised(exc)
        _reply(replies, message)


if __name__ == "__main__":
    main()
