"""A client that leaves mid-stream frees its slot without disturbing the other streams."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Server, start_server
from openai import AsyncOpenAI

MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def two_slots(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_server(Path(tmp_path_factory.mktemp("abort")), "--parallel", "2")
    yield server
    server.stop()


async def stream_tokens(client: AsyncOpenAI, max_tokens: int, abort_after: int | None = None) -> int:
    stream = await client.completions.create(
        model=MODEL,
        prompt="List every animal you know:",
        max_tokens=max_tokens,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = 0
    async for chunk in stream:
        if chunk.choices:
            chunks += 1
            if abort_after is not None and chunks >= abort_after:
                await stream.close()
                return chunks
        if chunk.usage:
            return chunk.usage.completion_tokens
    return -1


def test_aborted_stream_frees_its_slot(two_slots: Server) -> None:
    async def main() -> None:
        async with two_slots.async_client(timeout=60) as client:
            # Both slots busy: one stream that will be abandoned, one that must run to the end.
            aborted, survivor = await asyncio.gather(
                stream_tokens(client, 3000, abort_after=3), stream_tokens(client, 48)
            )
            assert aborted == 3
            assert survivor == 48
            # Had the aborted sequence kept its slot (3000 tokens: over a minute here), one of these two
            # would wait behind it and the timeout would fire.
            both = await asyncio.wait_for(
                asyncio.gather(stream_tokens(client, 16), stream_tokens(client, 16)), timeout=30
            )
            assert both == [16, 16]

    asyncio.run(main())


def test_requests_beyond_slots_wait_in_order_and_all_finish(two_slots: Server) -> None:
    async def main() -> list[int]:
        async with two_slots.async_client(timeout=120) as client:
            return await asyncio.gather(*(stream_tokens(client, 8) for _ in range(6)))

    assert asyncio.run(main()) == [8] * 6
