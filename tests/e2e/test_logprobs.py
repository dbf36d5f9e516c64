"""Logprobs in chat's and completions' shapes, streamed and not, through the real openai client."""

from __future__ import annotations

import math

import httpx
import pytest
from conftest import Server

MODEL = "smollm2-135m-instruct"
ASK = [{"role": "user", "content": "Name three colors of the rainbow."}]


def test_chat_logprobs_greedy_pick_the_top_token(smollm: Server) -> None:
    reply = smollm.client().chat.completions.create(
        model=MODEL,
        messages=ASK,
        logprobs=True,
        top_logprobs=5,
        temperature=0,
        max_tokens=16,  # type: ignore[arg-type]
    )
    choice = reply.choices[0]
    content = choice.message.content or ""
    entries = choice.logprobs.content if choice.logprobs else None
    assert entries
    assert "".join(e.token for e in entries) == content
    assert b"".join(bytes(e.bytes or []) for e in entries) == content.encode()
    for entry in entries:
        assert entry.logprob <= 0.0
        assert len(entry.top_logprobs) == 5
        ranked = [t.logprob for t in entry.top_logprobs]
        assert ranked == sorted(ranked, reverse=True)
        # Greedy decoding takes the most likely token, and reports the logprob it had.
        assert entry.top_logprobs[0].token == entry.token
        assert math.isclose(entry.top_logprobs[0].logprob, entry.logprob, abs_tol=1e-6)
        assert bytes(entry.top_logprobs[0].bytes or []) == bytes(entry.bytes or [])


def test_sampled_logprobs_come_from_the_truncated_distribution(smollm: Server) -> None:
    # With top_k=5 the distribution sampled from has exactly 5 tokens: their probabilities sum to 1 and the
    # sampled token is always among them.
    reply = smollm.client().chat.completions.create(
        model=MODEL,
        messages=ASK,  # type: ignore[arg-type]
        logprobs=True,
        top_logprobs=5,
        temperature=0.8,
        max_tokens=12,
        seed=7,
        extra_body={"top_k": 5},
    )
    entries = reply.choices[0].logprobs.content  # type: ignore[union-attr]
    assert entries
    for entry in entries:
        assert entry.logprob <= 0.0
        assert entry.token in [t.token for t in entry.top_logprobs]
        assert math.isclose(sum(math.exp(t.logprob) for t in entry.top_logprobs), 1.0, abs_tol=1e-3)


def test_streamed_chat_logprobs_match_the_content(smollm: Server) -> None:
    stream = smollm.client().chat.completions.create(
        model=MODEL,
        messages=ASK,
        logprobs=True,
        top_logprobs=2,
        temperature=0,
        max_tokens=16,
        stream=True,  # type: ignore[arg-type]
    )
    content, tokens = "", []
    for chunk in stream:
        if not chunk.choices:
            continue
        content += chunk.choices[0].delta.content or ""
        if chunk.choices[0].logprobs and chunk.choices[0].logprobs.content:
            tokens += [e.token for e in chunk.choices[0].logprobs.content]
    assert content and "".join(tokens) == content


def test_completions_legacy_logprobs(smollm: Server) -> None:
    reply = smollm.client().completions.create(
        model=MODEL, prompt="The capital of France is", logprobs=3, temperature=0, max_tokens=10
    )
    choice = reply.choices[0]
    lp = choice.logprobs
    assert lp is not None and lp.tokens and lp.token_logprobs and lp.top_logprobs and lp.text_offset is not None
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
    assert "".join(lp.tokens) == choice.text
    offset = 0
    for token, logprob, top, at in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, lp.text_offset, strict=True):
        assert at == offset
        offset += len(token)
        assert logprob is not None and logprob <= 0.0
        assert top and 1 <= len(top) <= 3
        assert max(top, key=top.get) == token  # type: ignore[arg-type]


def test_streamed_completions_logprobs(smollm: Server) -> None:
    stream = smollm.client().completions.create(
        model=MODEL, prompt="Once upon a time", logprobs=1, temperature=0, max_tokens=10, stream=True
    )
    text, tokens = "", []
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].text
            if chunk.choices[0].logprobs:
                tokens += chunk.choices[0].logprobs.tokens or []
    assert text and "".join(tokens) == text


@pytest.mark.parametrize(
    ("path", "extra", "param"),
    [
        ("chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ("chat/completions", {"top_logprobs": 2}, "top_logprobs"),
        ("completions", {"logprobs": 6}, "logprobs"),
        ("completions", {"logprobs": -1}, "logprobs"),
    ],
)
def test_out_of_range_logprobs_are_400(smollm: Server, path: str, extra: dict, param: str) -> None:
    body: dict[str, object] = {"model": MODEL, "max_tokens": 2, **extra}
    body.update({"messages": ASK} if path.startswith("chat") else {"prompt": "x"})
    response = httpx.post(f"{smollm.v1}/{path}", json=body, timeout=60)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"


def test_logprobs_leave_out_a_stop_string(smollm: Server) -> None:
    reply = smollm.client().chat.completions.create(
        model=MODEL,
        messages=ASK,
        logprobs=True,
        temperature=0,
        max_tokens=40,
        stop=[","],  # type: ignore[arg-type]
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "stop" and "," not in (choice.message.content or "")
    entries = choice.logprobs.content if choice.logprobs else None
    assert entries is not None
    assert "".join(e.token for e in entries) == choice.message.content
    # The same greedy answer without the stop string does go on with a comma: the stop string was cut.
    full = smollm.client().chat.completions.create(
        model=MODEL,
        messages=ASK,
        temperature=0,
        max_tokens=40,  # type: ignore[arg-type]
    )
    assert (full.choices[0].message.content or "").startswith(f"{choice.message.content},")
