"""Running the app with uvicorn: in the foreground (`moa-local serve`) or in a background thread of this process on
a free loopback port (tests, benchmarks). Knows nothing about routes or engines."""

from __future__ import annotations

import errno
import socket
import threading
import time
from typing import Any

from moa_local.errors import EngineStartError, InputError
from moa_local.server.limits import server_limits


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host``:``port``, bound now (before any engine loads), so a port in use is an
    InputError in a second, not after minutes of loading."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise InputError(f"--host {host} is not an address this machine has ({exc.strerror})") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        why = "is already in use" if exc.errno == errno.EADDRINUSE else f"cannot be bound ({exc.strerror})"
        raise InputError(f"port {port} on {host} {why}; choose another with --port") from None
    sock.set_inheritable(True)
    return sock


def serve_forever(app: Any, *, sock: socket.socket) -> None:
    """Serve on ``sock`` until Ctrl-C / SIGTERM (uvicorn's handlers), then return so the caller can close the
    engines."""
    import uvicorn

    config = uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=3, **server_limits())
    uvicorn.Server(config).run(sockets=[sock])



class BackgroundServer:
    """``with BackgroundServer(app) as url:`` serves ``app`` at ``url`` (http://127.0.0.1:<port>) until the block
    ends."""

    def __init__(self, app: Any, *, host: str = "127.0.0.1", port: int = 0, start_timeout_s: float = 20.0) -> None:
        import uvicorn

        self._server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on",
                                                     **server_limits()))
        self._thread = threading.Thread(target=self._server.run, name="moa-uvicorn", daemon=True)
        self._host = host
        self._timeout = start_timeout_s
        self.url = ""

    def __enter__(self) -> str:
        self._thread.start()
        deadline = time.monotonic() + self._timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise EngineStartError(f"the HTTP server did not start on {self._host} within {self._timeout:.0f} s")
            time.sleep(0.01)
        port = self._server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://{self._host}:{port}"
        return self.url

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)
