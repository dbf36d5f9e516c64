"""Every 200 from chat, completions (streamed and not; with tools, logprobs and n) and embeddings validates against
the response and chunk schemas of OpenAI's published OpenAPI document: strict clients and SDKs generated from it
accept what microserve sends."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from conftest import Server
from openai_schema import errors, validator

MODEL = "smollm2-135m-instruct"
EMBEDDING = "all-minilm-l6-v2"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
MESSAGES = [{"role": "user", "content": "Say hello to Paris."}]

CHAT_CASES: dict[str, dict[str, Any]] = {
    "plain": {},
    "n": {"n": 2, "temperature": 0.8, "seed": 1},
    "logprobs": {"logprobs": True, "top_logprobs": 2},
    # A whole call takes ~25 tokens of the template's markup and JSON: the budget lets one finish.
    "tools-required": {"tools": [WEATHER], "tool_choice": "required", "max_tokens": 64},
    "tools-auto": {"tools": [WEATHER]},
    "stop": {"stop": ["Paris"], "logprobs": True},
}
COMPLETION_CASES: dict[str, dict[str, Any]] = {
    "plain": {},
    "n": {"n": 2, "temperature": 0.8, "seed": 1},
    "logprobs": {"logprobs": 2},
    "prompts": {"prompt": ["One, two,", "Red, green,"], "n": 2},
    "echo": {"echo": True},
}


def _completions_chunk(doc: dict[str, Any]) -> None:
    # OpenAI's document gives streamed completions the reply's shape, whose finish_reason is a required string;
    # OpenAI's own stream sends null in every chunk but a choice's last, as the chat chunk schema allows.
    reason = doc["components"]["schemas"]["CreateCompletionResponse"]["properties"]["choices"]["items"]
    reason["properties"]["finish_reason"] = {"anyOf": [reason["properties"]["finish_reason"], {"type": "null"}]}


CHAT = validator("CreateChatCompletionResponse")
CHAT_CHUNK = validator("CreateChatCompletionStreamResponse")
COMPLETION = validator("CreateCompletionResponse")
COMPLETION_CHUNK = validator("CreateCompletionResponse", _completions_chunk)
EMBEDDINGS = validator("CreateEmbeddingResponse")


def _events(response: httpx.Response) -> list[dict[str, Any]]:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            events.append(json.loads(line[len("data: ") :]))
    return events


def _stream(server: Server, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    with httpx.stream("POST", f"{server.v1}{path}", json={**body, "stream": True}, timeout=120) as response:
        assert response.status_code == 200, response.read()
        events = _events(response)
    assert events and not any("error" in e for e in events), events
    return events


@pytest.mark.parametrize("case", sorted(CHAT_CASES))
def test_chat_completions_match_openais_schema(smollm: Server, case: str) -> None:
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 24, "temperature": 0, **CHAT_CASES[case]}
    response = httpx.post(f"{smollm.v1}/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    reply = response.json()
    assert errors(CHAT, reply) == []
    if case == "tools-required":
        assert reply["choices"][0]["message"]["tool_calls"]
    chunks = _stream(smollm, "/chat/completions", {**body, "stream_options": {"include_usage": True}})
    for chunk in chunks:
        assert errors(CHAT_CHUNK, chunk) == [], chunk
    assert chunks[-1]["usage"]["completion_tokens"] >= 1
    finished = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"] is not None]
    assert len(finished) == body.get("n", 1)


@pytest.mark.parametrize("case", sorted(COMPLETION_CASES))
def test_completions_match_openais_schema(smollm: Server, case: str) -> None:
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 12, "temperature": 0, **COMPLETION_CASES[case]}
    response = httpx.post(f"{smollm.v1}/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    assert errors(COMPLETION, response.json()) == []
    chunks = _stream(smollm, "/completions", {**body, "stream_options": {"include_usage": True}})
    for chunk in chunks:
        assert errors(COMPLETION_CHUNK, chunk) == [], chunk
        for choice in chunk["choices"]:
            assert "logprobs" in choice and "finish_reason" in choice


def test_embeddings_match_openais_schema(smollm: Server) -> None:
    for value in ("one sentence", ["two", "sentences"], [101, 2023, 102]):
        response = httpx.post(f"{smollm.v1}/embeddings", json={"model": EMBEDDING, "input": value}, timeout=60)
        assert response.status_code == 200, response.text
        assert errors(EMBEDDINGS, response.json()) == []
