"""n > 1 with a shared prefill, logit_bias, max_completion_tokens, stop and suffix limits."""

from __future__ import annotations

import asyncio
from collections import defaultdict

import httpx
import pytest
from conftest import Server

from microserve.catalog.manifest import find_builtin
from microserve.catalog.store import ModelStore
from microserve.engines.base import GenerationRequest, SamplingParams
from microserve.engines.llamacpp.engine import LlamaCppConfig, LlamaCppEngine
from microserve.settings import Settings

MODEL = "smollm2-135m-instruct"
ASK = [{"role": "user", "content": "Write a sentence about the sun."}]


def test_n3_returns_three_choices_and_counts_them_all(smollm: Server) -> None:
    client = smollm.client()
    single = client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        max_tokens=6,
        extra_body={"ignore_eos": True},  # type: ignore[arg-type]
    )
    reply = client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        n=3,
        max_tokens=6,
        seed=1,
        extra_body={"ignore_eos": True},  # type: ignore[arg-type]
    )
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert all(c.message.content and c.finish_reason == "length" for c in reply.choices)
    assert reply.usage is not None and single.usage is not None
    assert reply.usage.prompt_tokens == single.usage.prompt_tokens
    assert reply.usage.completion_tokens == 3 * 6
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 18


def test_n3_streams_every_choice(smollm: Server) -> None:
    stream = smollm.client().chat.completions.create(
        model=MODEL,
        messages=ASK,
        n=3,
        max_tokens=8,
        temperature=0,
        stream=True,  # type: ignore[arg-type]
    )
    texts: dict[int, str] = defaultdict(str)
    finishes: dict[int, str] = {}
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert sorted(finishes) == [0, 1, 2]
    # Greedy choices of one prompt are identical: the copied prompt KV is the prompt's own.
    assert texts[0] and texts[0] == texts[1] == texts[2]


def test_completions_n_with_two_prompts_indexes_prompt_major(smollm: Server) -> None:
    reply = smollm.client().completions.create(
        model=MODEL, prompt=["Red is", "Blue is"], n=2, max_tokens=4, temperature=0
    )
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    assert reply.choices[0].text == reply.choices[1].text
    assert reply.choices[2].text == reply.choices[3].text


def test_n_choices_share_one_prefill() -> None:
    """The engine computes the prompt once: the other choices copy its KV cells (all but the last token)."""
    manifest = find_builtin(MODEL)
    assert manifest is not None
    path = ModelStore(Settings().cache_dir).path_for(manifest)

    async def main() -> tuple[int, int, dict[int, list[int]], dict[int, list[int]]]:
        engine = LlamaCppEngine(LlamaCppConfig(path=str(path), model_id=MODEL, parallel=4, context_length=512))
        await engine.start()
        try:
            prompt = engine.tokenize("A fresh prompt that no slot has seen, about tea and mountains.", add_special=True)
            params = SamplingParams(max_tokens=8, temperature=0)
            before = engine.stats().prefix_hit_tokens
            outputs: dict[int, list[int]] = defaultdict(list)
            async for delta in engine.generate(GenerationRequest("n3", prompt, params, n=3)):
                outputs[delta.index].extend(delta.token_ids)
            shared = engine.stats().prefix_hit_tokens - before
            # More choices than slots: the late ones start after the first has finished and copy from the slot
            # that still holds the prompt.
            many: dict[int, list[int]] = defaultdict(list)
            other = engine.tokenize("Something else entirely, with more choices than slots.", add_special=True)
            async for delta in engine.generate(GenerationRequest("n6", other, params, n=6)):
                many[delta.index].extend(delta.token_ids)
            return len(prompt), shared, outputs, many
        finally:
            await engine.shutdown()

    prompt_len, shared, outputs, many = asyncio.run(main())
    assert shared >= 2 * (prompt_len - 1)
    assert outputs[0] and outputs[0] == outputs[1] == outputs[2]
    assert sorted(many) == list(range(6)) and all(many[i] == many[0] for i in range(6))


def _generated_pieces(smollm: Server, bias: dict[str, int] | None, seed: int) -> list[bytes]:
    reply = smollm.client().chat.completions.create(
        model=MODEL,
        messages=ASK,  # type: ignore[arg-type]
        max_tokens=30,
        seed=seed,
        logprobs=True,
        logit_bias=bias,  # type: ignore[arg-type]
    )
    return [bytes(e.bytes or []) for e in reply.choices[0].logprobs.content or []]  # type: ignore[union-attr]


def test_logit_bias_minus_100_bans_a_token(smollm: Server, smollm_vocab: object) -> None:
    the = smollm_vocab.tokenize(b" the", add_bos=False, special=False)  # type: ignore[attr-defined]
    assert len(the) == 1
    # Without a bias the model writes " the" about the sun; with -100 it never does.
    assert any(b" the" in _generated_pieces(smollm, None, seed) for seed in range(3))
    for seed in range(3):
        assert b" the" not in _generated_pieces(smollm, {str(the[0]): -100}, seed)


def test_greedy_text_is_the_same_with_and_without_logprobs(smollm: Server, smollm_vocab: object) -> None:
    # Without logprobs a plain greedy sequence takes the argmax itself; with them it goes through llama.cpp's
    # sampler chain. Both must pick the same tokens, biased or not, with EOS banned or not.
    the = smollm_vocab.tokenize(b" the", add_bos=False, special=False)  # type: ignore[attr-defined]
    eos = str(smollm_vocab.token_eos())  # type: ignore[attr-defined]
    # The EOS bias would end the reply at once; ignore_eos's ban must win over it, on both paths.
    for extra in ({}, {"logit_bias": {str(the[0]): -100, "1": 5}}, {"logit_bias": {eos: 100}, "ignore_eos": True}):
        body = {"model": MODEL, "messages": ASK, "max_tokens": 24, "temperature": 0, **extra}
        plain = httpx.post(f"{smollm.v1}/chat/completions", json=body, timeout=60).json()
        inspected = httpx.post(
            f"{smollm.v1}/chat/completions", json={**body, "logprobs": True, "top_logprobs": 2}, timeout=60
        ).json()
        text = plain["choices"][0]["message"]["content"]
        assert text and text == inspected["choices"][0]["message"]["content"], extra
        assert plain["choices"][0]["finish_reason"] == inspected["choices"][0]["finish_reason"] == "length"
        chosen = [entry["token"] for entry in inspected["choices"][0]["logprobs"]["content"]]
        assert "".join(chosen) == text


def test_max_completion_tokens_caps_the_completion(smollm: Server) -> None:
    reply = smollm.client().chat.completions.create(
        model=MODEL,
        messages=ASK,
        max_completion_tokens=3,
        extra_body={"ignore_eos": True},  # type: ignore[arg-type]
    )
    assert reply.usage is not None and reply.usage.completion_tokens == 3
    assert reply.choices[0].finish_reason == "length"


@pytest.mark.parametrize(
    ("path", "extra", "param"),
    [
        ("completions", {"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ("completions", {"suffix": "the end"}, "suffix"),
        ("chat/completions", {"logit_bias": {"99999999": -100}}, "logit_bias"),
        ("chat/completions", {"logit_bias": {"hello": 5}}, "logit_bias"),
        ("chat/completions", {"logit_bias": {"5": -101}}, "logit_bias"),
        ("chat/completions", {"n": 0}, "n"),
    ],
)
def test_bad_values_are_400(smollm: Server, path: str, extra: dict, param: str) -> None:
    body: dict[str, object] = {"model": MODEL, "max_tokens": 2, **extra}
    body.update({"messages": ASK} if path.startswith("chat") else {"prompt": "x"})
    response = httpx.post(f"{smollm.v1}/{path}", json=body, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert str(error["param"]).startswith(param) and error["type"] == "invalid_request_error"
