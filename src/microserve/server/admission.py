"""Admission control: a bounded wait queue per model in front of the engine's slots.

A request takes a slot if one is free, else waits in a FIFO queue of at most ``max_queue`` requests; beyond that
it is turned away at once with 429 and ``Retry-After``, and a request that waited longer than ``timeout`` gets 503.
Nothing waits without bound, and a client that leaves while queued gives its place up.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

from starlette.requests import Request

from microserve.errors import ServiceError
from microserve.server.logging import current_record
from microserve.server.streaming import until_disconnect

T = TypeVar("T")


class QueueFull(ServiceError):
    """Every slot is busy and the wait queue is full (429)."""

    status_code = 429
    error_type = "rate_limit_error"

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message, code="queue_full")
        self.headers = {"Retry-After": str(retry_after)}


class QueueTimeout(ServiceError):
    """The request waited for a slot longer than the queue timeout (503)."""

    status_code = 503
    error_type = "service_unavailable"

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message, code="queue_timeout")
        self.headers = {"Retry-After": str(retry_after)}


class Ticket:
    """A held slot; releasing it twice is harmless."""

    __slots__ = ("_gate", "_released", "queued_seconds", "started")

    def __init__(self, gate: Admission, queued_seconds: float) -> None:
        self._gate = gate
        self._released = False
        self.queued_seconds = queued_seconds
        self.started = time.monotonic()

    def release(self) -> None:
        """Give the slot to the next waiter, or free it."""
        if not self._released:
            self._released = True
            self._gate._release(time.monotonic() - self.started)


class Admission:
    """Slots and a bounded FIFO queue for one model."""

    def __init__(
        self,
        name: str,
        slots: int,
        max_queue: int,
        timeout: float,
        *,
        on_reject: Callable[[str], None] | None = None,
        on_admit: Callable[[float], None] | None = None,
    ) -> None:
        self.name = name
        self.slots = slots
        self.max_queue = max_queue
        self.timeout = timeout
        self.running = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._on_reject = on_reject
        self._on_admit = on_admit
        # A moving average of how long a request holds a slot, for Retry-After.
        self._hold_seconds = 1.0

    @property
    def waiting(self) -> int:
        """Requests queued for a slot."""
        return sum(1 for f in self._waiters if not f.done())

    def _retry_after(self) -> int:
        rounds = (self.waiting + 1) / max(self.slots, 1)
        return max(1, math.ceil(self._hold_seconds * rounds))

    def _reject(self, reason: str) -> None:
        if self._on_reject is not None:
            self._on_reject(reason)

    def _admitted(self, queued: float) -> Ticket:
        if self._on_admit is not None:
            self._on_admit(queued)
        return Ticket(self, queued)

    def check_capacity(self) -> None:
        """Raise QueueFull now if a new request could not even queue, before any work is spent on it."""
        if self.running >= self.slots and self.waiting >= self.max_queue:
            self._reject("queue_full")
            raise QueueFull(
                f"The server is at capacity for `{self.name}`: {self.slots} requests running and {self.max_queue} "
                "waiting. Retry later.",
                self._retry_after(),
            )

    async def acquire(self) -> Ticket:
        """A slot, after waiting in the queue if need be; raises QueueFull or QueueTimeout."""
        if self.running < self.slots and not self.waiting:
            self.running += 1
            return self._admitted(0.0)
        self.check_capacity()
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        entered = time.monotonic()
        try:
            async with asyncio.timeout(self.timeout):
                await future
        except BaseException as exc:
            if future.done() and not future.cancelled():
                # The slot was handed over just as the wait ended: pass it on.
                self._release(None)
            else:
                future.cancel()
            self._prune()
            if isinstance(exc, TimeoutError):
                self._reject("queue_timeout")
                raise QueueTimeout(
                    f"The request waited {self.timeout:g} s for a free slot of `{self.name}`. Retry later.",
                    self._retry_after(),
                ) from None
            raise
        return self._admitted(time.monotonic() - entered)

    def _prune(self) -> None:
        while self._waiters and self._waiters[0].done():
            self._waiters.popleft()

    def _release(self, held: float | None) -> None:
        if held is not None:
            self._hold_seconds = 0.8 * self._hold_seconds + 0.2 * held
        while self._waiters:
            future = self._waiters.popleft()
            if not future.done():
                future.set_result(None)  # the slot passes straight to the next waiter
                return
        self.running -= 1


def gate_for(request: Request, model_name: str) -> Admission:
    """The admission gate of a served model."""
    gates: dict[str, Admission] = request.app.state.admission
    return gates[model_name]


def shed_if_full(request: Request, model_name: str) -> None:
    """429 at once when the model's queue is full: checked before templating and tokenizing the request."""
    gate = request.app.state.admission.get(model_name)
    if gate is not None:
        gate.check_capacity()


async def admit(request: Request, model_name: str) -> Ticket:
    """Wait for a slot of the model; a client that disconnects meanwhile leaves the queue.

    The slot is also released when the response ends, whatever happens to the route's own release.
    """
    ticket = await until_disconnect(request, gate_for(request, model_name).acquire())
    record = current_record()
    if record is not None:
        record.queue_time = ticket.queued_seconds
        record.cleanups.append(ticket.release)
    return ticket


async def releasing(chunks: AsyncIterator[T], ticket: Ticket) -> AsyncIterator[T]:
    """Pass a stream through and free its slot when it ends, fails or is abandoned."""
    try:
        async for chunk in chunks:
            yield chunk
    finally:
        ticket.release()
