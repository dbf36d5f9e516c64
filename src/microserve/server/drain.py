"""Graceful drain: on SIGTERM/SIGINT readiness and new requests turn 503 at once, in-flight requests (streams
included) run to completion up to the drain timeout, then the server exits with status 0.

uvicorn's own shutdown closes the listener first, so a request arriving during the drain would be refused at the TCP
level; instead the signal only flips :class:`DrainState`, the listener keeps answering (503), and uvicorn is told to
exit once nothing is in flight.

The bound is one number: ``drain_timeout`` plus :data:`CLOSE_GRACE`. Requests still running at the drain timeout
are cut off by the server itself, so that each ends cleanly: a stream with a final SSE error event (code
``shutting_down``) and a complete chunked body, any other request with a 503. The grace that follows only lets those
last bytes go out and the connections close.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import signal
import time
from dataclasses import dataclass
from types import FrameType

import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from microserve.server.auth import is_public
from microserve.server.errors import send_error

log = logging.getLogger(__name__)

# Seconds between the drain timeout and exit: cut-off requests send their last event or 503, connections close.
CLOSE_GRACE = 5.0
CUT_MESSAGE = "The server is shutting down: the request was cut off at the end of the drain timeout."


@dataclass(eq=False, slots=True)
class InFlight:
    """One request in flight: the task to cancel to cut it off (its stream's task once it streams)."""

    task: asyncio.Task[object] | None
    cut: bool = False


_current: contextvars.ContextVar[InFlight | None] = contextvars.ContextVar("microserve_in_flight", default=None)


def stream_started() -> InFlight | None:
    """Called by a streamed response's generator as it starts, in the task that sends it: cutting the request off
    then cancels that task, and the generator ends the stream with an error event (see :func:`was_cut`)."""
    entry = _current.get()
    if entry is not None:
        entry.task = asyncio.current_task()
    return entry


def was_cut(entry: InFlight | None) -> bool:
    """Whether a cancellation of the request's task is the drain cutting it off; if so the task is uncancelled,
    so that it can still send its last bytes."""
    if entry is None or not entry.cut:
        return False
    task = asyncio.current_task()
    if task is not None:
        task.uncancel()
    return True


class DrainState:
    """Whether the app is draining, and the requests in flight."""

    def __init__(self) -> None:
        self.draining = False
        self.requests: set[InFlight] = set()

    @property
    def in_flight(self) -> int:
        """How many requests are being served."""
        return len(self.requests)

    def start(self) -> None:
        """Stop taking work."""
        self.draining = True

    def cut(self) -> int:
        """Cut off every request in flight; the number cut."""
        count = 0
        for entry in list(self.requests):
            if not entry.cut:
                entry.cut = True
                count += 1
                if entry.task is not None:
                    entry.task.cancel()
        return count


class DrainMiddleware:
    """Tracks in-flight requests, answers new ones with 503 while draining (probes and metrics still answer), and
    answers a request cut off at the drain timeout with 503 if its response had not started."""

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
                path=scope["path"],
            )
            return
        entry = InFlight(asyncio.current_task())
        token = _current.set(entry)
        self.state.requests.add(entry)
        started = False

        async def tracking(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking)
        except asyncio.CancelledError:
            if not was_cut(entry):
                raise
            if not started:
                await send_error(
                    send, 503, CUT_MESSAGE, headers={"Connection": "close"}, code="shutting_down", path=scope["path"]
                )
        finally:
            self.state.requests.discard(entry)
            _current.reset(token)


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
                "received %s: draining %d in-flight request(s); any still running after %gs are cut off, "
                "and the process exits within %gs",
                signal.Signals(sig).name,
                self.drain.in_flight,
                self.drain_timeout,
                self.drain_timeout + CLOSE_GRACE,
            )
            self.drain.start()
            self._deadline = time.monotonic() + self.drain_timeout
        elif sig == signal.SIGINT:
            self.should_exit = True
            self.force_exit = True

    async def on_tick(self, counter: int) -> bool:
        """Exit once the drain is over: nothing in flight, or the timeout passed and the rest were cut off."""
        if self._deadline is not None and not self.should_exit:
            if self.drain.in_flight == 0:
                log.info("drained; shutting down")
                self.should_exit = True
            elif time.monotonic() >= self._deadline:
                cut = self.drain.cut()
                log.warning(
                    "drain timeout (%gs): cut off %d request(s) still in flight (streams end with an error event, "
                    "other requests get 503); shutting down",
                    self.drain_timeout,
                    cut,
                )
                self.should_exit = True
        return await super().on_tick(counter)
