"""The llama.cpp scheduler on the real default model: admission order, cancellation, prefix reuse and eviction."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from microserve.catalog.manifest import find_builtin
from microserve.catalog.store import ModelStore
from microserve.engines.base import GenerationDelta, GenerationRequest, SamplingParams
from microserve.engines.llamacpp.engine import LlamaCppConfig, LlamaCppEngine
from microserve.settings import Settings


def model_path() -> str:
    manifest = find_builtin("smollm2-135m-instruct")
    assert manifest is not None
    return str(ModelStore(Settings().cache_dir).ensure(manifest))


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def make_engine(loop: asyncio.AbstractEventLoop, **config: Any) -> LlamaCppEngine:
    engine = LlamaCppEngine(LlamaCppConfig(path=model_path(), model_id="smollm", context_length=512, **config))
    loop.run_until_complete(engine.start())
    return engine


@pytest.fixture(scope="module")
def one_slot(loop: asyncio.AbstractEventLoop) -> Iterator[LlamaCppEngine]:
    engine = make_engine(loop, parallel=1)
    yield engine
    loop.run_until_complete(engine.shutdown())


@pytest.fixture(scope="module")
def two_slots(loop: asyncio.AbstractEventLoop) -> Iterator[LlamaCppEngine]:
    engine = make_engine(loop, parallel=2)
    yield engine
    loop.run_until_complete(engine.shutdown())


def request(engine: LlamaCppEngine, text: str, max_tokens: int, **params: Any) -> GenerationRequest:
    return GenerationRequest(
        request_id=text[:16],
        prompt_tokens=engine.tokenize(text, add_special=False),
        params=SamplingParams(max_tokens=max_tokens, temperature=0.0, **params),
    )


async def collect(stream: AsyncIterator[GenerationDelta]) -> tuple[str, GenerationDelta]:
    parts, last = [], None
    async for delta in stream:
        parts.append(delta.text)
        last = delta
    assert last is not None
    return "".join(parts), last


async def settle(engine: LlamaCppEngine, seconds: float = 2.0) -> None:
    """Wait until the engine thread has seen every cancellation (running and waiting both 0)."""
    for _ in range(int(seconds / 0.02)):
        stats = engine.stats()
        if stats.running == 0 and stats.waiting == 0:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"engine still busy: {engine.stats()}")


def test_requests_beyond_the_slots_are_admitted_in_arrival_order(
    one_slot: LlamaCppEngine, loop: asyncio.AbstractEventLoop
) -> None:
    started: list[str] = []

    async def run(name: str) -> None:
        async for delta in one_slot.generate(request(one_slot, f"Request {name} says", 6, ignore_eos=True)):
            if not started or started[-1] != name:
                started.append(name)
            assert delta.completion_tokens <= 6

    async def main() -> None:
        tasks = []
        for name in "ABCDE":
            tasks.append(asyncio.create_task(run(name)))
            await asyncio.sleep(0)  # each submits before the next is created
        await asyncio.gather(*tasks)

    loop.run_until_complete(main())
    # One slot: each request runs alone, start to end, in the order it arrived.
    assert started == list("ABCDE")


def test_cancelled_running_and_waiting_sequences_free_the_engine(
    one_slot: LlamaCppEngine, loop: asyncio.AbstractEventLoop
) -> None:
    async def main() -> None:
        long = one_slot.generate(request(one_slot, "Count forever:", 400, ignore_eos=True))
        await long.__anext__()  # running, holding the only slot
        queued = asyncio.create_task(collect(one_slot.generate(request(one_slot, "Never admitted", 4))))
        await asyncio.sleep(0.1)
        assert one_slot.stats().waiting == 1
        queued.cancel()
        await long.aclose()
        await settle(one_slot)
        # The slot is free again: a new request is served at once.
        _, last = await asyncio.wait_for(collect(one_slot.generate(request(one_slot, "Hello", 4))), 30)
        assert last.completion_tokens >= 1

    loop.run_until_complete(main())


def test_a_reused_prefix_gives_the_same_output_as_a_cold_run(
    two_slots: LlamaCppEngine, loop: asyncio.AbstractEventLoop
) -> None:
    history = "The user asked about lighthouses. The assistant explained how lenses focus light. " * 4
    turn = history + "Next, the user asked why the light rotates, and the assistant said"

    async def main() -> tuple[str, GenerationDelta, str, GenerationDelta]:
        await collect(two_slots.generate(request(two_slots, history, 8)))
        warm_text, warm = await collect(two_slots.generate(request(two_slots, turn, 24)))
        cold_engine = LlamaCppEngine(
            LlamaCppConfig(path=model_path(), model_id="cold", context_length=512, parallel=2, prefix_cache=False)
        )
        await cold_engine.start()
        try:
            cold_text, cold = await collect(cold_engine.generate(request(cold_engine, turn, 24)))
        finally:
            await cold_engine.shutdown()
        return warm_text, warm, cold_text, cold

    warm_text, warm, cold_text, cold = loop.run_until_complete(main())
    history_tokens = len(two_slots.tokenize(history, add_special=False))
    assert warm.cached_tokens >= history_tokens - 1
    assert cold.cached_tokens == 0
    assert warm_text == cold_text and warm.completion_tokens == cold.completion_tokens


def test_the_least_recently_used_prefix_is_evicted(two_slots: LlamaCppEngine, loop: asyncio.AbstractEventLoop) -> None:
    prompts = {
        name: f"{name} " + " ".join(f"{name.lower()}{i}" for i in range(30)) for name in ("Apple", "Banana", "Cherry")
    }

    async def cached(name: str) -> int:
        _, last = await collect(two_slots.generate(request(two_slots, prompts[name], 2)))
        return last.cached_tokens

    async def main() -> None:
        assert await cached("Apple") == 0
        assert await cached("Banana") == 0
        assert await cached("Cherry") == 0  # two slots: Apple's, the least recently used, is reused
        banana = len(two_slots.tokenize(prompts["Banana"], add_special=False))
        assert await cached("Banana") == banana - 1  # still cached; one token is decoded again for its logits
        assert await cached("Apple") == 0  # evicted
        stats = two_slots.stats()
        assert stats.prefix_hit_tokens >= banana - 1
        assert 0 < stats.kv_used <= stats.kv_total

    loop.run_until_complete(main())
