"""Token-id prompts and prompt logprobs on /v1/completions, checked against llama.cpp run directly on the same GGUF."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from conftest import Server

MODEL = "smollm2-135m-instruct"
TEXT = "The capital of France is Paris, and the capital of Italy is Rome."


@pytest.fixture(scope="module")
def direct(smollm: Server) -> Iterator[object]:
    """SmolLM2 in llama-cpp-python's high-level class with logits for every position: the reference."""
    from llama_cpp import Llama

    from microserve.catalog.manifest import find_builtin
    from microserve.catalog.store import ModelStore
    from microserve.settings import Settings

    manifest = find_builtin(MODEL)
    assert manifest is not None
    path = ModelStore(Settings().cache_dir).path_for(manifest)
    # Flash attention on, as in the engine (llama.cpp's default, auto, turns it on for the CPU): without it the
    # attention is summed in another precision, and SmolLM2's logprobs move by up to 0.4.
    model = Llama(str(path), logits_all=True, n_ctx=512, n_threads=1, flash_attn=True, verbose=False)
    yield model
    model.close()


def direct_logprobs(model: object, ids: list[int]) -> list[float]:
    """log P(ids[i] | ids[:i]) for i >= 1, from the model's raw logits."""
    model.reset()  # type: ignore[attr-defined]
    model.eval(ids)  # type: ignore[attr-defined]
    logits = np.array(model.scores[: len(ids)], dtype=np.float64)  # type: ignore[attr-defined]
    peak = logits.max(axis=1, keepdims=True)
    log_total = (peak + np.log(np.exp(logits - peak).sum(axis=1, keepdims=True)))[:, 0]
    return [float(logits[i - 1, ids[i]] - log_total[i - 1]) for i in range(1, len(ids))]


def completion(server: Server, **body: object) -> httpx.Response:
    return httpx.post(f"{server.v1}/completions", json={"model": MODEL, "temperature": 0, **body}, timeout=120)


def test_echoed_prompt_logprobs_equal_a_direct_computation(smollm: Server, direct: object) -> None:
    ids = direct.tokenize(TEXT.encode(), add_bos=False)  # type: ignore[attr-defined]
    reply = completion(smollm, prompt=TEXT, echo=True, logprobs=1, max_tokens=3)
    assert reply.status_code == 200, reply.text
    choice = reply.json()["choices"][0]
    logprobs = choice["logprobs"]
    assert choice["text"].startswith(TEXT)
    # One entry per prompt token, the first null (nothing precedes it), then the generated tokens'.
    assert len(logprobs["tokens"]) == len(ids) + 3
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    assert "".join(logprobs["tokens"]) == choice["text"]
    expected = direct_logprobs(direct, ids)
    served = logprobs["token_logprobs"][1 : len(ids)]
    assert max(abs(a - b) for a, b in zip(served, expected, strict=True)) < 1e-3
    offsets = logprobs["text_offset"]
    assert offsets == sorted(offsets) and offsets[0] == 0
    for entry, top in zip(served, logprobs["top_logprobs"][1 : len(ids)], strict=True):
        assert len(top) == 1 and max(top.values()) >= entry - 1e-6


def test_score_only_token_prompts_as_lm_eval_sends_them(smollm: Server, direct: object) -> None:
    first = direct.tokenize(b"One, two, three, four", add_bos=False)  # type: ignore[attr-defined]
    second = direct.tokenize(b"Roses are red, violets are blue", add_bos=False)  # type: ignore[attr-defined]
    reply = completion(smollm, prompt=[first, second], echo=True, logprobs=0, max_tokens=0)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["usage"]["completion_tokens"] == 0
    assert body["usage"]["prompt_tokens"] == len(first) + len(second)
    choices = sorted(body["choices"], key=lambda c: c["index"])
    for ids, choice in zip((first, second), choices, strict=True):
        assert choice["finish_reason"] == "length"
        assert choice["text"] == direct.detokenize(ids).decode()  # type: ignore[attr-defined]
        served = choice["logprobs"]["token_logprobs"]
        assert len(served) == len(ids) and served[0] is None
        assert max(abs(a - b) for a, b in zip(served[1:], direct_logprobs(direct, ids), strict=True)) < 1e-3


def test_token_prompt_generates_as_its_text_does(smollm: Server, direct: object) -> None:
    ids = direct.tokenize(b"1, 2, 3, 4,", add_bos=False)  # type: ignore[attr-defined]
    by_ids = completion(smollm, prompt=ids, max_tokens=8).json()
    by_text = completion(smollm, prompt="1, 2, 3, 4,", max_tokens=8).json()
    assert by_ids["choices"][0]["text"] == by_text["choices"][0]["text"]
    assert by_ids["usage"]["prompt_tokens"] == len(ids)


def test_streamed_echo_carries_the_prompt_logprobs_first(smollm: Server) -> None:
    body = {"model": MODEL, "prompt": TEXT, "echo": True, "logprobs": 2, "max_tokens": 4, "stream": True}
    chunks = []
    with httpx.stream("POST", f"{smollm.v1}/completions", json={**body, "temperature": 0}, timeout=120) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                chunks.append(httpx.Response(200, content=line[6:]).json())
    first = chunks[0]["choices"][0]
    assert first["text"] == TEXT
    assert first["logprobs"]["token_logprobs"][0] is None
    assert all(len(top) == 2 for top in first["logprobs"]["top_logprobs"][1:])
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]).startswith(TEXT)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": [1, 2, 10**7]}, "prompt"),
        ({"prompt": [[5, 6], [-1]]}, "prompt[1]"),
        ({"prompt": [[5, 6], []]}, "prompt[1]"),
        ({"prompt": "Hi", "max_tokens": 0}, "max_tokens"),
    ],
)
def test_bad_token_prompts_are_400(smollm: Server, body: dict[str, object], param: str) -> None:
    reply = completion(smollm, **body)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == param
