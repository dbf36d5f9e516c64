"""The llama.cpp scheduler on the real default model: admission order, cancellation, prefix reuse and eviction."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import llama_cpp as L
import pytest

from microserve.catalog.manifest import find_builtin
from microserve.catalog.store import ModelStore
from microserve.engines.base import GenerationDelta, GenerationRequest, SamplingParams
from microserve.engines.llamacpp.engine import LlamaCppConfig, LlamaCppEngine
from microserve.settings import Settings


def model_path(profile_id: str | None = None) -> str:
    manifest = find_builtin("smollm2-135m-instruct")
    assert manifest is not None
    profile = next(p for p in manifest.profiles if p.id == profile_id) if profile_id else None
    return str(ModelStore(Settings().cache_dir).ensure(manifest, profile))


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def make_engine(loop: asyncio.AbstractEventLoop, profile_id: str | None = None, **config: Any) -> LlamaCppEngine:
    path = model_path(profile_id)
    engine = LlamaCppEngine(LlamaCppConfig(path=path, model_id="smollm", context_length=512, **config))
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


@pytest.fixture(scope="module")
def two_slots_q4_1(loop: asyncio.AbstractEventLoop) -> Iterator[LlamaCppEngine]:
    # The shipped Q4_1 file: its integer dot products give a row the same logits whatever else is in the batch,
    # which the F16 default's float kernels do not, so a seeded sample can repeat beside other requests.
    engine = make_engine(loop, "llamacpp-cpu-q4_1", parallel=2)
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


def test_a_seeded_request_repeats_whatever_else_runs_beside_it(
    two_slots_q4_1: LlamaCppEngine, loop: asyncio.AbstractEventLoop
) -> None:
    def sampled(text: str, seed: int | None, n: int = 1) -> GenerationRequest:
        params = SamplingParams(max_tokens=24, temperature=1.0, top_p=0.95, seed=seed, ignore_eos=True)
        return GenerationRequest(text[:16], two_slots_q4_1.tokenize(text, add_special=False), params, n=n)

    async def tokens(req: GenerationRequest) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        async for delta in two_slots_q4_1.generate(req):
            out.setdefault(delta.index, []).extend(delta.token_ids)
        return out

    async def main() -> tuple[list[int], list[int], dict[int, list[int]], dict[int, list[int]]]:
        story = "Write a story about a fox who finds a key:"
        alone = (await tokens(sampled(story, seed=42)))[0]
        # The same request again, batched with an unseeded neighbour that starts first and one that starts after.
        neighbour = asyncio.create_task(tokens(sampled("A recipe for bread, step by step:", seed=None)))
        await asyncio.sleep(0.05)
        again = asyncio.create_task(tokens(sampled(story, seed=42)))
        await asyncio.sleep(0.05)
        late = asyncio.create_task(tokens(sampled("Ten facts about the moon:", seed=None)))
        beside = (await again)[0]
        await asyncio.gather(neighbour, late)
        choices = await tokens(sampled(story, seed=7, n=2))
        repeated = await tokens(sampled(story, seed=7, n=2))
        return alone, beside, choices, repeated

    alone, beside, choices, repeated = loop.run_until_complete(main())
    assert len(alone) == 24 and beside == alone
    # The choices of one seeded request differ from each other, and each repeats with the request.
    assert choices[0] != choices[1] and choices == repeated


def test_each_slot_holds_its_own_tokens_from_position_zero(
    two_slots: LlamaCppEngine, loop: asyncio.AbstractEventLoop
) -> None:
    # A decode step attends over the cells in use, not over the context: each slot is a stream of its own (a
    # sequence's cells never interleave with another's) and holds exactly the tokens it caches, from position 0.
    # A larger context then costs nothing per step while the same tokens are in use.
    scheduler = two_slots._scheduler
    ctx = two_slots._ctx
    assert scheduler is not None and ctx is not None

    async def main() -> None:
        await asyncio.gather(
            collect(two_slots.generate(request(two_slots, "A long story about a lighthouse keeper and", 12))),
            collect(two_slots.generate(request(two_slots, "Two plus two is", 3, ignore_eos=True))),
        )
        await settle(two_slots)

    loop.run_until_complete(main())

    def placement() -> tuple[int, list[tuple[int, int, int]]]:
        mem = L.llama_get_memory(ctx)
        spans = [
            (
                len(slot.tokens),
                L.llama_memory_seq_pos_min(mem, slot.seq_id),
                L.llama_memory_seq_pos_max(mem, slot.seq_id),
            )
            for slot in scheduler._slots
        ]
        return L.llama_n_ctx_seq(ctx), spans

    n_ctx_seq, spans = scheduler.call(placement).result(timeout=30)
    assert n_ctx_seq == 512  # each sequence has a full slot's context of its own, not a share of a unified cache
    assert sorted(n for n, _, _ in spans)[0] > 0
    for n, first, last in spans:
        assert (first, last) == (0, n - 1)
