"""Running the app with uvicorn: in the foreground (`moa-local serve`) or in a background thread of this process on
a free loopback port (tests, benchmarks). Knows nothing about routes or engines."""

from __future__ import annotations

import threading
import time
from typing import Any

from moa_local.errors import EngineStartError


def serve_forever(app: Any, *, host: str, port: int) -> None:
    """Serve until Ctrl-C / SIGTERM (uvicorn's handlers), then return so the caller can close the engines."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=10)


class BackgroundServer:
    """``with BackgroundServer(app) as url:`` serves ``app`` at ``url`` (http://127.0.0.1:<port>) until the block
    ends."""

    def __init__(self, app: Any, *, host: str = "127.0.0.1", port: int = 0, start_timeout_s: float = 20.0) -> None:
        import uvicorn

        self._server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on"))
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
