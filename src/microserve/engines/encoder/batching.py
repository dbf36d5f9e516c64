"""Dynamic batching: inputs of concurrent requests share one forward pass.

A worker thread takes the first waiting input, then keeps collecting until the batch is full or the wait bound has
passed since that first input, runs one forward pass, and hands each request its rows on its own event loop.
Requests larger than a batch are split across passes; small ones ride along with others.

Waiting only pays when other requests are in flight: a lone request is run at once, and under load the inputs
that queue up while a pass runs fill the next one without waiting (as continuous batching does for generation).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

In = TypeVar("In")
Out = TypeVar("Out")


@dataclass(eq=False)
class _Job(Generic[Out]):
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[list[Out]]
    results: list[Out | None]
    remaining: int
    failed: bool = False


@dataclass(slots=True)
class _Item(Generic[In, Out]):
    job: _Job[Out]
    index: int
    value: In
    enqueued: float = field(default_factory=time.monotonic)


def _resolve(future: asyncio.Future[list[Out]], rows: list[Out]) -> None:
    if not future.done():
        future.set_result(rows)


def _reject(future: asyncio.Future[list[Out]], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


class DynamicBatcher(Generic[In, Out]):
    """Runs ``forward`` on batches of at most ``max_batch`` inputs, waiting at most ``max_wait_s`` to fill one."""

    def __init__(
        self, forward: Callable[[list[In]], list[Out]], *, max_batch: int, max_wait_s: float, name: str
    ) -> None:
        self._forward = forward
        self.max_batch = max_batch
        self._max_wait = max_wait_s
        self._queue: queue.SimpleQueue[_Item[In, Out] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._stopping = False
        self.forward_passes = 0
        self.inputs = 0
        # Requests between submit and result; written on the event loop only, read by the worker.
        self._active = 0

    def start(self) -> None:
        """Start the worker thread."""
        self._thread.start()

    def stop(self) -> None:
        """Finish the batch in progress, fail what waits, and join the worker."""
        self._stopping = True
        self._queue.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    @property
    def waiting(self) -> int:
        """Inputs queued for a forward pass."""
        return self._queue.qsize()

    async def submit(self, values: Sequence[In]) -> list[Out]:
        """Rows for ``values`` in order, computed in as few passes as the concurrent load allows."""
        if self._stopping:
            raise RuntimeError("the encoder is shutting down")
        loop = asyncio.get_running_loop()
        job: _Job[Out] = _Job(
            loop=loop, future=loop.create_future(), results=[None] * len(values), remaining=len(values)
        )
        if not values:
            return []
        self._active += 1
        try:
            for i, value in enumerate(values):
                self._queue.put(_Item(job, i, value))
            return await job.future
        finally:
            self._active -= 1

    def _collect(self, first: _Item[In, Out]) -> list[_Item[In, Out]]:
        batch = [first]
        jobs = {id(first.job)}
        deadline = first.enqueued + self._max_wait
        while len(batch) < self.max_batch:
            try:
                # Whatever is already queued joins without waiting; only an unfilled batch waits out the bound,
                # and only while some other request is in flight and may still add inputs.
                item = self._queue.get_nowait()
            except queue.Empty:
                left = deadline - time.monotonic()
                if left <= 0 or self._active <= len(jobs):
                    break
                try:
                    item = self._queue.get(timeout=left)
                except queue.Empty:
                    break
            if item is None:
                self._queue.put(None)
                break
            if not item.job.failed:
                batch.append(item)
                jobs.add(id(item.job))
        return batch

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None or self._stopping:
                break
            if first.job.failed:
                continue
            batch = self._collect(first)
            try:
                rows = self._forward([item.value for item in batch])
            except Exception as exc:
                log.exception("encoder forward pass failed")
                for item in batch:
                    if not item.job.failed:
                        item.job.failed = True
                        item.job.loop.call_soon_threadsafe(_reject, item.job.future, exc)
                continue
            self.forward_passes += 1
            self.inputs += len(batch)
            for item, row in zip(batch, rows, strict=True):
                job = item.job
                job.results[item.index] = row
                job.remaining -= 1
                if job.remaining == 0:
                    job.loop.call_soon_threadsafe(_resolve, job.future, list(job.results))  # type: ignore[arg-type]
        # Shutdown: whoever still waits gets an error instead of hanging.
        if first is not None and not first.job.failed:
            first.job.failed = True
            first.job.loop.call_soon_threadsafe(_reject, first.job.future, RuntimeError("the encoder stopped"))
        while True:
            try:
                left = self._queue.get_nowait()
            except queue.Empty:
                return
            if left is not None and not left.job.failed:
                left.job.failed = True
                left.job.loop.call_soon_threadsafe(_reject, left.job.future, RuntimeError("the encoder stopped"))
