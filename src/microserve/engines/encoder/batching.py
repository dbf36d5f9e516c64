"""Dynamic batching: inputs of concurrent requests share one forward pass.

A worker thread takes the first waiting input, then keeps collecting until the batch is full or the wait bound has
passed since that first input, runs one forward pass, and hands each request its rows on its own event loop.
Requests larger than a batch are split across passes; small ones ride along with others.

Waiting only pays when other requests are in flight: a lone request is run at once, and under load the inputs
that queue up while a pass runs fill the next one without waiting (as continuous batching does for generation).

Under load a pass also takes only a share of the inputs that were recently in flight: a half with one worker, a
quarter with two. Clients whose rows a pass has just computed need time to get their replies and send their next
requests, and a pass that took them all would leave its worker idle meanwhile; with the load in shares, as many
shares travel as are computed, and the next pass finds its inputs queued. Past a handful of inputs a batch costs
as little per input as a full one, so the split keeps the cores busy for almost nothing.

When more inputs wait than a pass takes, a pass takes inputs of similar length: every row of a pass is padded to
its longest one, so on inputs of uneven length a pass of a mix spends much of its work on padding. The oldest
waiting input is always in the next pass, with the waiting inputs nearest to it in length (among the oldest few
passes' worth), so nothing waits longer than the inputs queued ahead of it take to run.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

# Below this many inputs a pass costs noticeably more per input, so the load is not split finer.
MIN_SPLIT = 4
# A pass picks inputs of like length among this many times its size of the oldest waiting inputs.
POOL = 4

In = TypeVar("In")
Out = TypeVar("Out")


@dataclass(eq=False)
class _Job(Generic[Out]):
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[list[Out]]
    results: list[Out | None]
    remaining: int
    failed: bool = False


@dataclass(slots=True, eq=False)
class _Item(Generic[In, Out]):
    job: _Job[Out]
    index: int
    value: In
    size: int
    enqueued: float = field(default_factory=time.monotonic)


def _resolve(future: asyncio.Future[list[Out]], rows: list[Out]) -> None:
    if not future.done():
        future.set_result(rows)


def _reject(future: asyncio.Future[list[Out]], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


class DynamicBatcher(Generic[In, Out]):
    """Runs batches of at most ``max_batch`` inputs, waiting at most ``max_wait_s`` to fill one.

    Each of ``forwards`` gets a worker thread of its own; workers take turns collecting a batch and then run their
    passes side by side (each forward is called from its own thread only).
    """

    def __init__(
        self,
        forwards: Sequence[Callable[[list[In]], list[Out]]],
        *,
        max_batch: int,
        max_wait_s: float,
        name: str,
        size: Callable[[In], int] | None = None,
    ) -> None:
        if not forwards:
            raise ValueError("a batcher needs at least one forward pass")
        self.max_batch = max_batch
        self._max_wait = max_wait_s
        # How long an input is, as its forward pass pads it; without it inputs run in arrival order.
        self._size = size
        # Inputs waiting for a pass, oldest first; guarded by the condition, which submit() signals.
        self._pending: list[_Item[In, Out]] = []
        self._ready = threading.Condition(threading.Lock())
        self._threads = [
            threading.Thread(
                target=self._run, args=(forward,), name=name if len(forwards) == 1 else f"{name}-{i}", daemon=True
            )
            for i, forward in enumerate(forwards)
        ]
        self._stopping = False
        # One worker collects at a time, so a batch is never torn between two of them.
        self._collecting = threading.Lock()
        self._counting = threading.Lock()
        self.forward_passes = 0
        self.inputs = 0
        # Requests and their inputs between submit and result; written on the event loop only, read by workers.
        self._active = 0
        self._in_flight = 0
        # The most inputs in flight since a worker last looked; the loop raises it, the collecting worker lowers it
        # to the current count. A lost update only skews one estimate of the load.
        self._peak = 0

    def start(self) -> None:
        """Start the worker threads."""
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """Finish the batches in progress, fail what waits, and join the workers."""
        with self._ready:
            self._stopping = True
            self._ready.notify_all()
        for thread in self._threads:
            if thread.is_alive():
                thread.join(timeout=30)
        # Whoever still waits gets an error instead of hanging.
        with self._ready:
            left, self._pending = self._pending, []
        self._fail(left, RuntimeError("the encoder stopped"))

    @property
    def waiting(self) -> int:
        """Inputs queued for a forward pass."""
        return len(self._pending)

    async def submit(self, values: Sequence[In]) -> list[Out]:
        """Rows for ``values`` in order, computed in as few passes as the concurrent load allows."""
        if not values:
            return []
        loop = asyncio.get_running_loop()
        job: _Job[Out] = _Job(
            loop=loop, future=loop.create_future(), results=[None] * len(values), remaining=len(values)
        )
        self._active += 1
        self._in_flight += len(values)
        self._peak = max(self._peak, self._in_flight)
        size = self._size
        items = [_Item(job, i, value, size(value) if size is not None else 0) for i, value in enumerate(values)]
        try:
            with self._ready:
                # Checked under the lock: stop() fails what is pending once, so nothing may join after it.
                if self._stopping:
                    raise RuntimeError("the encoder is shutting down")
                self._pending.extend(items)
                self._ready.notify()
            return await job.future
        except asyncio.CancelledError:
            # The client left: its inputs still in the queue are dropped instead of computed.
            job.failed = True
            raise
        finally:
            self._active -= 1
            self._in_flight -= len(values)

    def _cap(self) -> int:
        """Inputs the next pass may take: the whole bound for a lone request, else 1/(2 x workers) of the recent
        load (at least MIN_SPLIT), so that as many shares travel to and from the clients as are computed."""
        peak, self._peak = self._peak, self._in_flight
        if self._active <= 1:
            return self.max_batch
        return min(self.max_batch, max(MIN_SPLIT, math.ceil(peak / (2 * len(self._threads)))))

    def _collect(self) -> list[_Item[In, Out]]:
        """The next pass's inputs, waiting for the first one; empty once the batcher stops.

        Called with ``_collecting`` held, so one worker at a time waits here.
        """
        with self._ready:
            while True:
                if self._stopping:
                    return []
                if self._drop_cancelled():
                    break
                self._ready.wait()
            deadline = self._pending[0].enqueued + self._max_wait
            cap = self._cap()
            # Whatever is already queued joins without waiting; only an unfilled batch waits out the bound, and only
            # while some other request is in flight and may still add inputs.
            while len(self._pending) < cap and not self._stopping:
                left = deadline - time.monotonic()
                if left <= 0 or self._active <= len({id(item.job) for item in self._pending}):
                    break
                self._ready.wait(left)
                if not self._drop_cancelled():
                    return []
            batch = self._choose(cap)
            taken = set(map(id, batch))
            self._pending = [item for item in self._pending if id(item) not in taken]
            return batch

    def _drop_cancelled(self) -> int:
        """Drop the waiting inputs of requests whose clients left (called under the lock); how many inputs wait."""
        self._pending = [item for item in self._pending if not item.job.failed]
        return len(self._pending)

    def _choose(self, cap: int) -> list[_Item[In, Out]]:
        """At most ``cap`` waiting inputs: the oldest, and those nearest to it in length when more are waiting.

        Only the ``POOL x cap`` oldest are candidates, which bounds the sorting when huge requests queue up.
        """
        pending = self._pending
        if len(pending) <= cap:
            return list(pending)
        if self._size is None:
            return pending[:cap]
        oldest = pending[0]
        # Stable: among inputs of one length the older come first.
        ranked = sorted(pending[: POOL * cap], key=lambda item: item.size)
        at = next(i for i, item in enumerate(ranked) if item is oldest)
        # Of the runs of ``cap`` inputs in length order that hold the oldest, the one whose lengths spread least.
        starts = range(max(0, at - cap + 1), min(at, len(ranked) - cap) + 1)
        start = min(starts, key=lambda i: ranked[i + cap - 1].size - ranked[i].size)
        return ranked[start : start + cap]

    @staticmethod
    def _fail(items: Sequence[_Item[In, Out]], exc: BaseException) -> None:
        for item in items:
            if not item.job.failed:
                item.job.failed = True
                item.job.loop.call_soon_threadsafe(_reject, item.job.future, exc)

    def _run(self, forward: Callable[[list[In]], list[Out]]) -> None:
        while True:
            with self._collecting:
                batch = self._collect()
            if not batch:
                if self._stopping:
                    return
                continue
            try:
                rows = forward([item.value for item in batch])
            except Exception as exc:
                log.exception("encoder forward pass failed")
                self._fail(batch, exc)
                continue
            with self._counting:
                self.forward_passes += 1
                self.inputs += len(batch)
                for item, row in zip(batch, rows, strict=True):
                    job = item.job
                    job.results[item.index] = row
                    job.remaining -= 1
                    if job.remaining == 0:
                        job.loop.call_soon_threadsafe(_resolve, job.future, list(job.results))  # type: ignore[arg-type]
