"""What one HTTP client may hold: the connection-level limits of `moa-local serve`.

uvicorn's h11 protocol with: headers at most ``MAX_HEADER_BYTES`` (h11 refuses more with a 400 before the app sees
the request), and a deadline for a request's headers to arrive, ``HEADER_TIMEOUT_S`` from the connection's start or
the previous response (a client that sends half a request and waits is disconnected: no slow-loris). Idle
keep-alive connections close after ``KEEP_ALIVE_S``. The body's own limits (size while reading, a deadline, JSON
depth) are the app's, in openai.py. Knows nothing about routes or engines.
"""

from __future__ import annotations

import asyncio
from typing import Any

MAX_HEADER_BYTES = 64 * 1024
"""Largest request head (request line + headers) accepted."""

HEADER_TIMEOUT_S = 10.0
"""Seconds a connection may take to send a complete request head."""

BODY_TIMEOUT_S = 30.0
"""Seconds a request may take to send its whole body (enforced by the app while reading)."""

KEEP_ALIVE_S = 5
"""Seconds an idle keep-alive connection stays open."""


def _protocol() -> Any:
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeadDeadlineH11Protocol(H11Protocol):
        """h11 with a deadline on each request head (see the module doc)."""

        _head_timer: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            self._disarm()
            self._head_timer = self.loop.call_later(HEADER_TIMEOUT_S, self._head_too_slow)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_too_slow(self) -> None:
            self._head_timer = None
            idle = self.cycle is None or self.cycle.response_complete
            if idle and not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm()

        def handle_events(self) -> None:
            super().handle_events()
            if self.cycle is not None and not self.cycle.response_complete:
                self._disarm()  # a whole head arrived: the app now owns the request (and the body deadline)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return HeadDeadlineH11Protocol


def server_limits() -> dict[str, Any]:
    """uvicorn.Config keyword arguments for these limits."""
    try:
        http: Any = _protocol()
    except ImportError:  # uvicorn moved its internals: the plain h11 protocol still caps the head's size
        http = "h11"
    return {"http": http, "h11_max_incomplete_event_size": MAX_HEADER_BYTES, "timeout_keep_alive": KEEP_ALIVE_S}
