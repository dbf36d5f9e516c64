"""Dynamic batching of encoder inputs, with a plain Python forward pass in place of a model."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

import pytest

from microserve.engines.encoder.batching import DynamicBatcher
from microserve.engines.encoder.engine import split_threads

In = TypeVar("In")
Out = TypeVar("Out")


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
    batcher: DynamicBatcher[int, int] = DynamicBatcher([forward], max_batch=8, max_wait_s=0.05, name="t")
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
    batcher: DynamicBatcher[int, int] = DynamicBatcher([forward], max_batch=4, max_wait_s=0.001, name="t")
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
    batcher: DynamicBatcher[int, int] = DynamicBatcher([forward], max_batch=4, max_wait_s=0.001, name="t")
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

    batcher: DynamicBatcher[int, int] = DynamicBatcher([slow], max_batch=1, max_wait_s=0.0, name="t")
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


def test_two_workers_run_passes_side_by_side_and_keep_order() -> None:
    first, second = Recorder(delay=0.01), Recorder(delay=0.01)
    batcher: DynamicBatcher[int, int] = DynamicBatcher([first, second], max_batch=4, max_wait_s=0.001, name="t")
    batcher.start()

    async def scenario() -> tuple[list[int], list[list[int]]]:
        big = batcher.submit(list(range(40)))
        singles = asyncio.gather(*(batcher.submit([100 + i]) for i in range(16)))
        return await big, list(await singles)

    try:
        big, singles = asyncio.run(scenario())
    finally:
        batcher.stop()
    assert big == [2 * i for i in range(40)]
    assert singles == [[2 * (100 + i)] for i in range(16)]
    assert first.batches and second.batches  # both workers took passes
    assert first.threads == {"t-0"} and second.threads == {"t-1"}
    assert batcher.inputs == 56 == sum(len(b) for b in first.batches + second.batches)


def test_under_load_a_pass_leaves_work_for_the_next_one() -> None:
    # 32 requests in flight and one worker: a pass takes about half of them, so that the other half is already
    # queued when it ends instead of the worker waiting for clients to come back.
    forward = Recorder(delay=0.02)
    batcher: DynamicBatcher[int, int] = DynamicBatcher([forward], max_batch=32, max_wait_s=0.005, name="t")
    batcher.start()

    async def closed_loop(client: int) -> None:
        for round_ in range(4):
            assert await batcher.submit([client * 10 + round_]) == [2 * (client * 10 + round_)]

    async def scenario() -> None:
        await asyncio.gather(*(closed_loop(c) for c in range(32)))

    try:
        asyncio.run(scenario())
    finally:
        batcher.stop()
    assert batcher.inputs == 128
    assert max(len(b) for b in forward.batches) <= 16
    assert batcher.forward_passes < 128 / 4  # still batched: most passes carry many requests


def test_a_lone_request_is_not_split() -> None:
    forward = Recorder()
    batcher: DynamicBatcher[int, int] = DynamicBatcher([forward], max_batch=32, max_wait_s=0.001, name="t")
    batcher.start()
    try:
        assert asyncio.run(batcher.submit(list(range(32)))) == [2 * i for i in range(32)]
    finally:
        batcher.stop()
    assert [len(b) for b in forward.batches] == [32]


class Held(Generic[In, Out]):
    """A forward pass that records its batches and holds each until released, so that inputs queue up behind the
    first one; it answers each input with ``answer``."""

    def __init__(self, answer: Callable[[In], Out]) -> None:
        self.answer = answer
        self.passes: list[list[In]] = []
        self.started = threading.Event()
        self.release = threading.Event()

    def __call__(self, batch: list[In]) -> list[Out]:
        self.passes.append(list(batch))
        self.started.set()
        self.release.wait(5)
        return [self.answer(x) for x in batch]

    async def running(self) -> None:
        """Return once the first pass has started (and is held)."""
        await asyncio.to_thread(self.started.wait, 5)


def test_a_cancelled_request_drops_its_queued_inputs() -> None:
    held: Held[int, int] = Held(lambda x: x)
    batcher: DynamicBatcher[int, int] = DynamicBatcher([held], max_batch=1, max_wait_s=0.0, name="t")
    batcher.start()

    async def scenario() -> None:
        first = asyncio.ensure_future(batcher.submit([1]))
        await held.running()
        leaving = asyncio.ensure_future(batcher.submit([2, 3, 4]))
        await asyncio.sleep(0.01)
        leaving.cancel()
        await asyncio.sleep(0.01)
        held.release.set()
        assert await first == [1]
        assert await batcher.submit([5]) == [5]

    try:
        asyncio.run(asyncio.wait_for(scenario(), 10))
    finally:
        batcher.stop()
    assert held.passes == [[1], [5]]


def test_waiting_inputs_are_grouped_by_length_around_the_oldest() -> None:
    # A pass pads its rows to the longest: with more inputs waiting than a pass takes, the next pass takes the
    # oldest waiting input and those nearest to it in length.
    held: Held[str, int] = Held(len)
    batcher: DynamicBatcher[str, int] = DynamicBatcher([held], max_batch=4, max_wait_s=0.0, name="t", size=len)
    batcher.start()
    lengths = [1, 9, 2, 8, 3, 7, 1, 9, 2, 8, 3, 7]

    async def scenario() -> list[list[int]]:
        first = asyncio.ensure_future(batcher.submit(["first"]))
        await held.running()
        waiting = [asyncio.ensure_future(batcher.submit(["x" * n])) for n in lengths]
        await asyncio.sleep(0.02)
        held.release.set()
        assert await first == [5]
        return list(await asyncio.gather(*waiting))

    try:
        results = asyncio.run(asyncio.wait_for(scenario(), 10))
    finally:
        batcher.stop()
    assert results == [[n] for n in lengths]
    # The oldest (1) with its nearest; then the oldest left (9) with its nearest; then the rest.
    assert [sorted(map(len, p)) for p in held.passes[1:]] == [[1, 1, 2, 2], [8, 8, 9, 9], [3, 3, 7, 7]]


def test_without_a_size_inputs_run_in_arrival_order() -> None:
    held: Held[int, int] = Held(lambda x: x)
    batcher: DynamicBatcher[int, int] = DynamicBatcher([held], max_batch=4, max_wait_s=0.0, name="t")
    batcher.start()

    async def scenario() -> None:
        first = asyncio.ensure_future(batcher.submit([0]))
        await held.running()
        waiting = [asyncio.ensure_future(batcher.submit([n])) for n in (9, 1, 8, 2, 7, 3, 6, 4)]
        await asyncio.sleep(0.02)
        held.release.set()
        await asyncio.gather(first, *waiting)

    try:
        asyncio.run(asyncio.wait_for(scenario(), 10))
    finally:
        batcher.stop()
    assert held.passes[1:] == [[9, 1, 8, 2], [7, 3, 6, 4]]


@pytest.mark.parametrize(
    ("threads", "workers", "expected"),
    [(1, None, (1, 1)), (2, None, (2, 1)), (16, None, (2, 8)), (16, 4, (4, 4)), (2, 8, (2, 1)), (8, 1, (1, 8))],
)
def test_threads_are_shared_out_among_workers(threads: int, workers: int | None, expected: tuple[int, int]) -> None:
    assert split_threads(threads, workers) == expected
