"""Dynamic batching of encoder inputs, with a plain Python forward pass in place of a model."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from microserve.engines.encoder.batching import DynamicBatcher


class Recorder:
    """A forward pass that doubles numbers and records the batches it saw."""

    def __init__(self, delay: float = 0.0, fail_on: int | None = None) -> None:
        self.batches: list[list[int]] = []
        self.delay = delay
        self.fail_on = fail_on
        self.threads: set[str] = set()

    def __call__(self, batch: list[int]) -> list[int]:
        self.threads.add(threading.current_thread().name)
        if self.fail_on is not None and self.fail_on in batch:
            raise ValueError("bad input")
        time.sleep(self.delay)
        self.batches.append(list(batch))
        return [2 * x for x in batch]


async def _run_concurrent(batcher: DynamicBatcher[int, int], n: int) -> list[list[int]]:
    return list(await asyncio.gather(*(batcher.submit([i]) for i in range(n))))


def test_concurrent_single_inputs_share_forward_passes() -> None:
    forward = Recorder(delay=0.01)
    batcher: DynamicBatcher[int, int] = DynamicBatcher(forward, max_batch=8, max_wait_s=0.05, name="t")
    batcher.start()
    try:
        results = asyncio.run(_run_concurrent(batcher, 32))
    finally:
        batcher.stop()
    assert results == [[2 * i] for i in range(32)]
    assert batcher.inputs == 32
    assert batcher.forward_passes == len(forward.batches) < 32
    assert max(len(b) for b in forward.batches) == 8
    assert forward.threads == {"t"}  # never on the caller's (event loop) thread


def test_large_request_is_split_and_kept_in_order() -> None:
    forward = Recorder()
    batcher: DynamicBatcher[int, int] = DynamicBatcher(forward, max_batch=4, max_wait_s=0.001, name="t")
    batcher.start()
    try:
        rows = asyncio.run(batcher.submit(list(range(10))))
    finally:
        batcher.stop()
    assert rows == [2 * i for i in range(10)]
    assert all(len(b) <= 4 for b in forward.batches)
    assert batcher.forward_passes >= 3


def test_a_failing_pass_fails_its_requests_and_the_batcher_goes_on() -> None:
    forward = Recorder(fail_on=13)
    batcher: DynamicBatcher[int, int] = DynamicBatcher(forward, max_batch=4, max_wait_s=0.001, name="t")
    batcher.start()

    async def scenario() -> list[int]:
        with pytest.raises(ValueError, match="bad input"):
            await batcher.submit([13])
        return await batcher.submit([1, 2])

    try:
        assert asyncio.run(scenario()) == [2, 4]
    finally:
        batcher.stop()


def test_stop_fails_whoever_waits() -> None:
    started = threading.Event()
    release = threading.Event()

    def slow(batch: list[int]) -> list[int]:
        started.set()
        release.wait(5)
        return batch

    batcher: DynamicBatcher[int, int] = DynamicBatcher(slow, max_batch=1, max_wait_s=0.0, name="t")
    batcher.start()

    async def scenario() -> None:
        first = asyncio.ensure_future(batcher.submit([1]))
        second = asyncio.ensure_future(batcher.submit([2]))
        await asyncio.to_thread(started.wait, 5)
        stopper = asyncio.ensure_future(asyncio.to_thread(batcher.stop))
        await asyncio.sleep(0.05)
        release.set()
        await stopper
        assert await first == [1]
        with pytest.raises(RuntimeError):
            await second
        with pytest.raises(RuntimeError):
            await batcher.submit([3])

    asyncio.run(asyncio.wait_for(scenario(), 10))
