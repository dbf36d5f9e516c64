"""Admission control: a bounded wait queue per model in front of the engine's slots.

A request takes a slot if one is free, else waits in a FIFO queue of at most ``max_queue`` requests; beyond that
it is turned away at once with 429 and ``Retry-After``, and a request that waited longer than ``timeout`` gets 503.
Nothing waits without bound, and a client that leaves while queued gives its place up.

A request that runs several engine sequences (``n`` > 1, or a list of prompts) takes that many slots, at most all
of them; the queue stays first in, first out, so a wide request at its head is not overtaken by narrow ones.
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
from microserve.observability.record import current_record
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
    """Held slots; releasing them twice is harmless."""

    __slots__ = ("_gate", "_released", "queued_seconds", "started", "weight")

    def __init__(self, gate: Admission, queued_seconds: float, weight: int) -> None:
        self._gate = gate
        self._released = False
        self.queued_seconds = queued_seconds
        self.started = time.monotonic()
        self.weight = weight

    def release(self) -> None:
        """Give the slots to the next waiters, or free them."""
        if not self._released:
            self._released = True
            self._gate._release(self.weight, time.monotonic() - self.started)


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
        self.running = 0  # slots held (engine sequences), not requests
        self._waiters: deque[tuple[asyncio.Future[None], int]] = deque()
        self._on_reject = on_reject
        self._on_admit = on_admit
        # A moving average of how long a request holds a slot, for Retry-After.
        self._hold_seconds = 1.0

    @property
    def waiting(self) -> int:
        """Requests queued for a slot."""
        return sum(1 for f, _ in self._waiters if not f.done())

    def _retry_after(self) -> int:
        rounds = (self.waiting + 1) / max(self.slots, 1)
        return max(1, math.ceil(self._hold_seconds * rounds))

    def _reject(self, reason: str) -> None:
        if self._on_reject is not None:
            self._on_reject(reason)

    def _admitted(self, queued: float, weight: int) -> Ticket:
        if self._on_admit is not None:
            self._on_admit(queued)
        return Ticket(self, queued, weight)

    def _weight(self, sequences: int) -> int:
        return max(1, min(sequences, self.slots))

    def check_capacity(self, sequences: int = 1) -> None:
        """Raise QueueFull now if a new request could not even queue, before any work is spent on it."""
        fits = self.running + self._weight(sequences) <= self.slots and not self.waiting
        if not fits and self.waiting >= self.max_queue:
            self._reject("queue_full")
            raise QueueFull(
                f"The server is at capacity for `{self.name}`: its {self.slots} slots are busy and {self.max_queue} "
                "requests are waiting. Retry later.",
                self._retry_after(),
            )

    def try_acquire(self, sequences: int = 1) -> Ticket | None:
        """Slots for ``sequences`` engine sequences at once if they are free and nobody waits, else None."""
        weight = self._weight(sequences)
        if self.running + weight <= self.slots and not self.waiting:
            self.running += weight
            return self._admitted(0.0, weight)
        return None

    async def acquire(self, sequences: int = 1) -> Ticket:
        """Slots for ``sequences`` engine sequences (capped at all of them), after waiting in the queue if need be;
        raises QueueFull or QueueTimeout."""
        ticket = self.try_acquire(sequences)
        if ticket is not None:
            return ticket
        weight = self._weight(sequences)
        self.check_capacity(sequences)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((future, weight))
        entered = time.monotonic()
        try:
            async with asyncio.timeout(self.timeout):
                await future
        except BaseException as exc:
            if future.done() and not future.cancelled():
                # The slots were handed over just as the wait ended: pass them on.
                self._release(weight, None)
            else:
                future.cancel()
                # A wide request leaving the head of the queue may let narrower ones behind it in.
                self._dispatch()
            if isinstance(exc, TimeoutError):
                self._reject("queue_timeout")
                raise QueueTimeout(
                    f"The request waited {self.timeout:g} s for a free slot of `{self.name}`. Retry later.",
                    self._retry_after(),
                ) from None
            raise
        return self._admitted(time.monotonic() - entered, weight)

    def _release(self, weight: int, held: float | None) -> None:
        if held is not None:
            self._hold_seconds = 0.8 * self._hold_seconds + 0.2 * held
        self.running -= weight
        self._dispatch()

    def _dispatch(self) -> None:
        # Freed slots pass straight to the waiters at the head of the queue, in order, while they fit.
        while self._waiters:
            future, wanted = self._waiters[0]
            if future.done():
                self._waiters.popleft()
                continue
            if self.running + wanted > self.slots:
                return
            self._waiters.popleft()
            self.running += wanted
            future.set_result(None)


def _gate(request: Request, model_name: str) -> Admission | None:
    # Gates belong to engines: a base model and the adapters on it share one engine's slots and queue.
    model = request.app.state.models.find(model_name)
    return request.app.state.admission.get(model.engine_key) if model is not None else None


def shed_if_full(request: Request, model_name: str, sequences: int = 1) -> None:
    """429 at once when the model's queue is full: checked before templating and tokenizing the request."""
    gate = _gate(request, model_name)
    if gate is not None:
        gate.check_capacity(sequences)


async def admit(request: Request, model_name: str, sequences: int = 1) -> Ticket:
    """Wait for slots of the model's engine for ``sequences`` engine sequences; a client that disconnects meanwhile
    leaves the queue.

    The slots are also released when the response ends, whatever happens to the route's own release.
    """
    gate = _gate(request, model_name)
    if gate is None:  # pragma: no cover - the services found the model before admission
        raise KeyError(model_name)
    # Most requests find a free slot; only one that has to queue needs watching for its client leaving.
    ticket = gate.try_acquire(sequences)
    if ticket is None:
        ticket = await until_disconnect(request, gate.acquire(sequences))
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
