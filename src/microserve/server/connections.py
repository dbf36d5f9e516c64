"""Connection guards below the ASGI app: a bound on the time to send a request's headers, and on open connections.

uvicorn bounds idle keep-alive connections (``timeout_keep_alive``) but not the time a client takes to send its
headers: a client sending one header byte a second holds its connection, and the memory behind it, for as long as
it likes, and fifty such clients (slowloris) hold fifty. Here each connection must deliver a request's complete
headers within ``header_timeout`` seconds of opening, or of the first byte of its next request; otherwise it is
answered 408 and closed. A connection beyond ``max_connections`` is answered 503 and closed at once. Both answers
are OpenAI error bodies, written directly on the transport, as no request has reached the app.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger(__name__)


def raw_error(status: int, reason: str, message: str, code: str) -> bytes:
    """A complete HTTP/1.1 error response that closes the connection."""
    kind = "service_unavailable" if status == 503 else "invalid_request_error"
    body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}}).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a header deadline and a connection cap (set by :func:`guarded_protocol`)."""

    header_timeout: float = 10.0
    max_connections: int = 1000
    _last_refusal_log = 0.0  # refusals are logged at most every 10 s: a flood must not flood the log too

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None
        self._headers_done = True

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """Refuse a connection over the cap; otherwise start the clock on the first request's headers."""
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            now = time.monotonic()
            if now - GuardedProtocol._last_refusal_log >= 10.0:
                GuardedProtocol._last_refusal_log = now
                log.warning("refusing connections: %d are open, the limit (max_connections)", self.max_connections)
            transport.write(
                raw_error(503, "Service Unavailable", "Too many open connections; retry later.", "too_many_connections")
            )
            transport.close()
            return
        self._start_header_clock()

    def connection_lost(self, exc: Exception | None) -> None:
        """Stop the clock with the connection."""
        self._stop_header_clock()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        """A new request's first byte: its headers must be complete within the timeout."""
        super().on_message_begin()
        if self._header_timer is None:
            self._start_header_clock()

    def on_headers_complete(self) -> None:
        """The headers arrived in time."""
        self._stop_header_clock()
        super().on_headers_complete()

    def _start_header_clock(self) -> None:
        self._headers_done = False
        self._header_timer = self.loop.call_later(self.header_timeout, self._header_timeout)

    def _stop_header_clock(self) -> None:
        self._headers_done = True
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self._headers_done or self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            # A pipelined request is slow while the one before it is still being answered: look again later
            # rather than cut that response off.
            self._header_timer = self.loop.call_later(self.header_timeout, self._header_timeout)
            return
        message = f"The request headers did not arrive within {self.header_timeout:g}s."
        self.transport.write(raw_error(408, "Request Timeout", message, "header_timeout"))
        self.transport.close()


def guarded_protocol(header_timeout: float, max_connections: int) -> type[GuardedProtocol]:
    """The protocol class for uvicorn's ``http`` setting, with these bounds."""
    return type(
        "GuardedHttpProtocol",
        (GuardedProtocol,),
        {"header_timeout": header_timeout, "max_connections": max_connections},
    )
