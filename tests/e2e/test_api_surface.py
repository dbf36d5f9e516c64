"""The routes around generation that clients probe: one model, the tokenizer, HEAD, unknown routes, content the
model cannot take, and the constraint fields of llama-server and vLLM."""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import pytest
from conftest import Server

MODEL = "smollm2-135m-instruct"
EMBEDDER = "all-minilm-l6-v2"


def chat(server: Server, **body: object) -> httpx.Response:
    payload = {"model": MODEL, "messages": [{"role": "user", "content": "Describe a cat."}], "max_tokens": 40}
    return httpx.post(f"{server.v1}/chat/completions", json={**payload, "temperature": 0, **body}, timeout=120)


def test_models_retrieve_with_the_openai_client(smollm: Server) -> None:
    client = smollm.client()
    model = client.models.retrieve(MODEL)
    assert model.id == MODEL and model.object == "model"
    assert client.models.retrieve(EMBEDDER).id == EMBEDDER
    missing = httpx.get(f"{smollm.v1}/models/nope", timeout=10)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def test_tokenize_and_detokenize_in_vllm_shapes(smollm: Server, smollm_vocab: object) -> None:
    text = "Hello there, tokenizer!"
    reply = httpx.post(f"{smollm.url}/tokenize", json={"prompt": text, "return_token_strs": True}, timeout=10).json()
    assert reply["tokens"] == smollm_vocab.tokenize(text.encode(), add_bos=False, special=True)  # type: ignore[attr-defined]
    assert reply["count"] == len(reply["tokens"]) and reply["max_model_len"] > 0
    assert "".join(reply["token_strs"]) == text
    back = httpx.post(f"{smollm.url}/detokenize", json={"model": MODEL, "tokens": reply["tokens"]}, timeout=10)
    assert back.json() == {"prompt": text}
    chat_ids = httpx.post(
        f"{smollm.url}/tokenize", json={"model": MODEL, "messages": [{"role": "user", "content": text}]}, timeout=10
    ).json()
    assert chat_ids["count"] > reply["count"]  # the template's markup is counted too
    bad = httpx.post(f"{smollm.url}/detokenize", json={"tokens": [10**8]}, timeout=10)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


@pytest.mark.parametrize("path", ["/metrics", "/v1/metrics", "/v1/models", "/v1/health/ready", "/v1/metadata"])
def test_head_answers_every_get_route_without_a_body(smollm: Server, path: str) -> None:
    get = httpx.get(f"{smollm.url}{path}", timeout=10)
    head = httpx.head(f"{smollm.url}{path}", timeout=10)
    assert head.status_code == get.status_code == 200
    assert head.content == b""
    assert head.headers["content-type"] == get.headers["content-type"]


def test_an_unknown_route_names_itself_and_the_served_apis(smollm: Server) -> None:
    reply = httpx.post(f"{smollm.url}/v1/chat/complete", json={}, timeout=10)
    assert reply.status_code == 404
    message = reply.json()["error"]["message"]
    assert "POST /v1/chat/complete" in message
    for family in ("OpenAI", "Anthropic", "/v1/responses", "/v1/messages", "/v1/embeddings", "/tokenize"):
        assert family in message
    wrong_method = httpx.get(f"{smollm.v1}/chat/completions", timeout=10)
    assert wrong_method.status_code == 405 and "POST" in wrong_method.json()["error"]["message"]


@pytest.mark.parametrize(
    ("part", "word"),
    [
        ({"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}, "image"),
        ({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}, "audio"),
    ],
)
def test_a_content_part_the_model_cannot_take_is_a_clear_400(smollm: Server, part: dict, word: str) -> None:
    content = [{"type": "text", "text": "What is this?"}, part]
    reply = chat(smollm, messages=[{"role": "user", "content": content}])
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == "messages[0].content[1]" and error["code"] == "unsupported_content"
    assert f"{word} input is not supported" in error["message"] and MODEL in error["message"]


SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 20}, "legs": {"type": "integer"}},
    "required": ["name", "legs"],
}


@pytest.mark.parametrize(
    "fields",
    [
        {"json_schema": SCHEMA},  # llama-server
        {"response_format": {"type": "json_object", "schema": SCHEMA}},  # llama-server
        {"structured_outputs": {"json": SCHEMA}},  # vLLM
        {"guided_json": SCHEMA},  # vLLM and NIM
    ],
)
def test_peer_json_schema_fields_constrain_the_output(smollm: Server, fields: dict[str, object]) -> None:
    reply = chat(smollm, **fields)
    assert reply.status_code == 200, reply.text
    jsonschema.validate(json.loads(reply.json()["choices"][0]["message"]["content"]), SCHEMA)


GRAMMAR = 'root ::= "The cat is " ("black" | "white" | "orange") "."'


@pytest.mark.parametrize("fields", [{"grammar": GRAMMAR}, {"structured_outputs": {"grammar": GRAMMAR}}])
def test_peer_grammar_fields_constrain_the_output(smollm: Server, fields: dict[str, object]) -> None:
    for path, body in (("chat/completions", {}), ("completions", {"prompt": "Tell me about the cat:"})):
        payload = {"model": MODEL, "max_tokens": 20, "temperature": 0.8, "seed": 3, **fields}
        payload.update(body or {"messages": [{"role": "user", "content": "Describe a cat."}]})
        reply = httpx.post(f"{smollm.v1}/{path}", json=payload, timeout=120)
        assert reply.status_code == 200, reply.text
        choice = reply.json()["choices"][0]
        text = choice["text"] if "text" in choice else choice["message"]["content"]
        assert re.fullmatch(r"The cat is (black|white|orange)\.", text), text


def test_two_constraints_and_an_unsupported_sampler_are_refused_by_name(smollm: Server) -> None:
    both = chat(smollm, grammar=GRAMMAR, json_schema=SCHEMA)
    assert both.status_code == 400 and both.json()["error"]["param"] == "json_schema"
    for field, value in (("mirostat", 2), ("typical_p", 0.5), ("stop_token_ids", [5]), ("chat_template", "x")):
        refused = chat(smollm, **{field: value})
        assert refused.status_code == 400, (field, refused.text)
        assert refused.json()["error"]["param"] == field and field in refused.json()["error"]["message"]
    # Neutral values, as llama.cpp's web UI sends them, and fields that change nothing, are served.
    neutral = chat(smollm, mirostat=0, typical_p=1.0, dry_multiplier=0, cache_prompt=True, samplers="kt", max_tokens=4)
    assert neutral.status_code == 200, neutral.text
