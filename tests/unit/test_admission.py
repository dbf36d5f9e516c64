"""The admission gate: slots, a bounded FIFO queue, 429 when full, 503 after the queue timeout."""

from __future__ import annotations

import asyncio

import pytest

from microserve.server.admission import Admission, QueueFull, QueueTimeout


def run(coro: object) -> None:
    asyncio.run(coro)  # type: ignore[arg-type]


def test_slots_then_queue_then_429_with_retry_after() -> None:
    async def main() -> None:
        rejected: list[str] = []
        gate = Admission("m", slots=2, max_queue=2, timeout=10, on_reject=rejected.append)
        held = [await gate.acquire(), await gate.acquire()]
        waiters = [asyncio.create_task(gate.acquire()) for _ in range(2)]
        await asyncio.sleep(0)
        assert gate.running == 2 and gate.waiting == 2
        with pytest.raises(QueueFull) as info:
            await gate.acquire()
        assert info.value.status_code == 429 and int(info.value.headers["Retry-After"]) >= 1
        assert rejected == ["queue_full"]
        # Releasing hands the slot to the first waiter, in order.
        held[0].release()
        held[0].release()  # a second release is a no-op
        first = await waiters[0]
        assert not waiters[1].done() and gate.running == 2 and gate.waiting == 1
        held[1].release()
        second = await waiters[1]
        first.release()
        second.release()
        assert gate.running == 0 and gate.waiting == 0

    run(main())


def test_a_request_that_waits_too_long_gets_503_and_leaves_the_queue() -> None:
    async def main() -> None:
        rejected: list[str] = []
        gate = Admission("m", slots=1, max_queue=4, timeout=0.05, on_reject=rejected.append)
        held = await gate.acquire()
        with pytest.raises(QueueTimeout) as info:
            await gate.acquire()
        assert info.value.status_code == 503 and rejected == ["queue_timeout"]
        assert gate.waiting == 0
        held.release()
        assert gate.running == 0

    run(main())


def test_a_cancelled_waiter_gives_its_place_up() -> None:
    async def main() -> None:
        gate = Admission("m", slots=1, max_queue=4, timeout=10)
        held = await gate.acquire()
        leaving = asyncio.create_task(gate.acquire())
        staying = asyncio.create_task(gate.acquire())
        await asyncio.sleep(0)
        leaving.cancel()
        await asyncio.gather(leaving, return_exceptions=True)
        assert gate.waiting == 1
        held.release()
        (await staying).release()
        assert gate.running == 0 and gate.waiting == 0

    run(main())


def test_queue_time_is_reported_on_admission() -> None:
    async def main() -> None:
        queued: list[float] = []
        gate = Admission("m", slots=1, max_queue=1, timeout=10, on_admit=queued.append)
        held = await gate.acquire()
        waiter = asyncio.create_task(gate.acquire())
        await asyncio.sleep(0.05)
        held.release()
        (await waiter).release()
        assert queued[0] == 0.0 and queued[1] >= 0.04

    run(main())


def test_a_request_of_several_sequences_holds_that_many_slots() -> None:
    async def main() -> None:
        gate = Admission("m", slots=4, max_queue=4, timeout=10)
        wide = await gate.acquire(3)
        assert gate.running == 3
        # Two more sequences do not fit beside three: the request waits although one slot is free.
        pair = asyncio.create_task(gate.acquire(2))
        await asyncio.sleep(0)
        assert not pair.done() and gate.waiting == 1
        # First in, first out: a single sequence queued behind the pair does not overtake it.
        single = asyncio.create_task(gate.acquire(1))
        await asyncio.sleep(0)
        assert not single.done()
        wide.release()
        held_pair, held_single = await pair, await single
        assert gate.running == 3 and gate.waiting == 0
        held_pair.release()
        held_single.release()
        # More sequences than slots take all the slots rather than waiting forever.
        everything = await asyncio.wait_for(gate.acquire(10), 1)
        assert gate.running == 4
        everything.release()
        assert gate.running == 0

    run(main())


def test_a_wide_waiter_leaving_the_head_lets_the_next_in() -> None:
    async def main() -> None:
        gate = Admission("m", slots=2, max_queue=4, timeout=10)
        held = await gate.acquire(1)
        wide = asyncio.create_task(gate.acquire(2))
        narrow = asyncio.create_task(gate.acquire(1))
        await asyncio.sleep(0)
        assert gate.waiting == 2
        wide.cancel()
        await asyncio.gather(wide, return_exceptions=True)
        (await asyncio.wait_for(narrow, 1)).release()
        held.release()
        assert gate.running == 0 and gate.waiting == 0

    run(main())


def test_a_free_slot_is_taken_without_waiting_and_none_when_busy() -> None:
    gate = Admission("m", slots=1, max_queue=4, timeout=1.0)
    ticket = gate.try_acquire()
    assert ticket is not None and gate.running == 1
    assert gate.try_acquire() is None and gate.running == 1
    ticket.release()
    assert gate.running == 0
