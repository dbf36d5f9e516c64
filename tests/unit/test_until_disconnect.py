"""Client-disconnect handling around a request's work: the work is cancelled, the caller learns why."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from microserve.server.errors import ClientDisconnected
from microserve.server.streaming import until_disconnect


class FakeRequest:
    """``receive`` answers ``http.disconnect`` after ``leave_after`` seconds, or never."""

    def __init__(self, leave_after: float | None) -> None:
        self.leave_after = leave_after

    async def receive(self) -> dict[str, Any]:
        if self.leave_after is None:
            await asyncio.Event().wait()
        await asyncio.sleep(self.leave_after or 0)
        return {"type": "http.disconnect"}


def test_work_that_finishes_first_returns_its_result() -> None:
    async def work() -> int:
        await asyncio.sleep(0.01)
        return 7

    assert asyncio.run(until_disconnect(FakeRequest(None), work())) == 7  # type: ignore[arg-type]


def test_a_client_leaving_cancels_the_work() -> None:
    cancelled = asyncio.Event()

    async def work() -> int:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return 0

    async def scenario() -> None:
        with pytest.raises(ClientDisconnected):
            await until_disconnect(FakeRequest(0.01), work())  # type: ignore[arg-type]
        assert cancelled.is_set()
        # The task goes on normally afterwards: the cancellation was consumed.
        await asyncio.sleep(0)

    asyncio.run(asyncio.wait_for(scenario(), 5))


def test_a_cancellation_from_elsewhere_stays_a_cancellation() -> None:
    async def scenario() -> None:
        task = asyncio.ensure_future(until_disconnect(FakeRequest(None), asyncio.sleep(10)))  # type: ignore[arg-type]
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(asyncio.wait_for(scenario(), 5))
