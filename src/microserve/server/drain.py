"""Graceful drain: on SIGTERM/SIGINT readiness and new requests turn 503 at once, in-flight requests (streams
included) run to completion up to the drain timeout, then the server exits with status 0.

uvicorn's own shutdown closes the listener first, so a request arriving during the drain would be refused at the TCP
level; instead the signal only flips :class:`DrainState`, the listener keeps answering (503), and uvicorn is told to
exit once nothing is in flight.
"""

from __future__ import annotations

import logging
import signal
import time
from types import FrameType

import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send

from microserve.server.auth import is_public
from microserve.server.errors import send_error

log = logging.getLogger(__name__)


class DrainState:
    """Whether the app is draining, and how many requests are in flight."""

    def __init__(self) -> None:
        self.draining = False
        self.in_flight = 0

    def start(self) -> None:
        """Stop taking work."""
        self.draining = True


class DrainMiddleware:
    """Counts in-flight requests and answers new ones with 503 while draining (probes and metrics still answer)."""

    def __init__(self, app: ASGIApp, state: DrainState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or is_public(scope["path"], metrics_public=True):
            await self.app(scope, receive, send)
            return
        if self.state.draining:
            await send_error(
                send,
                503,
                "The server is shutting down and takes no new requests.",
                headers={"Connection": "close", "Retry-After": "1"},
                code="shutting_down",
            )
            return
        self.state.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.state.in_flight -= 1


class DrainingServer(uvicorn.Server):
    """uvicorn, with signals that start a drain instead of closing the listener."""

    def __init__(self, config: uvicorn.Config, state: DrainState, drain_timeout: float) -> None:
        super().__init__(config)
        self.drain = state
        self.drain_timeout = drain_timeout
        self._deadline: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """First signal: drain. A second SIGINT: exit now, as uvicorn does."""
        if self._deadline is None:
            log.info(
                "received %s: draining %d in-flight request(s), up to %gs",
                signal.Signals(sig).name,
                self.drain.in_flight,
                self.drain_timeout,
            )
            self.drain.start()
            self._deadline = time.monotonic() + self.drain_timeout
        elif sig == signal.SIGINT:
            self.should_exit = True
            self.force_exit = True

    async def on_tick(self, counter: int) -> bool:
        """Exit once the drain is over: nothing in flight, or the timeout passed."""
        if self._deadline is not None and not self.should_exit:
            if self.drain.in_flight == 0:
                log.info("drained; shutting down")
                self.should_exit = True
            elif time.monotonic() >= self._deadline:
                log.warning("drain timeout: %d request(s) still in flight are cut off", self.drain.in_flight)
                self.should_exit = True
        return await super().on_tick(counter)
