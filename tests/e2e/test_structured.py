"""Structured outputs: JSON schemas, JSON mode, guided choice/regex/grammar, through the real openai client."""

from __future__ import annotations

import asyncio
import json
import re

import httpx
import jsonschema
import pytest
from conftest import Server

MODEL = "smollm2-135m-instruct"

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 18, "maximum": 99},
        "color": {"type": "string", "enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 1, "maxItems": 3},
    },
    "required": ["name", "age", "color", "tags"],
    "additionalProperties": False,
}
ASK = [{"role": "user", "content": "Describe a fictional person as JSON with a name, age, favourite color and tags."}]


def test_json_schema_output_validates_on_ten_seeds(smollm: Server) -> None:
    response_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}

    async def main() -> list[tuple[str, str | None]]:
        async with smollm.async_client(timeout=240) as client:

            async def one(seed: int) -> tuple[str, str | None]:
                reply = await client.chat.completions.create(
                    model=MODEL,
                    messages=ASK,  # type: ignore[arg-type]
                    response_format=response_format,  # type: ignore[arg-type]
                    max_tokens=120,
                    seed=seed,
                    temperature=1.0,
                )
                return reply.choices[0].message.content or "", reply.choices[0].finish_reason

            return await asyncio.gather(*(one(seed) for seed in range(10)))

    results = asyncio.run(main())
    for text, finish in results:
        assert finish == "stop", text
        jsonschema.validate(json.loads(text), PERSON)
    # Sampling still varies between seeds: the grammar constrains, it does not dictate.
    assert len({text for text, _ in results}) > 1


def test_streamed_json_schema_reassembles_to_valid_json(smollm: Server) -> None:
    stream = smollm.client().chat.completions.create(
        model=MODEL,
        messages=ASK,  # type: ignore[arg-type]
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}},
        max_tokens=120,
        seed=11,
        stream=True,
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    jsonschema.validate(json.loads(text), PERSON)


def test_json_object_mode_returns_an_object(smollm: Server) -> None:
    reply = smollm.client().chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Give me a JSON object describing a cat."}],
        response_format={"type": "json_object"},
        max_tokens=80,
        seed=3,
        extra_body={"top_k": 20},
    )
    if reply.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(reply.choices[0].message.content or ""), dict)
    else:  # cut off by max_tokens: still an object's prefix
        assert (reply.choices[0].message.content or "").lstrip().startswith("{")


@pytest.mark.parametrize("where", ["nvext", "top"])
def test_guided_choice_returns_one_of_the_choices(smollm: Server, where: str) -> None:
    choices = ["positive", "negative", "neutral"]
    guided = {"guided_choice": choices}
    extra = {"nvext": guided} if where == "nvext" else guided
    for seed in range(3):
        reply = smollm.client().chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Sentiment of: 'I love this phone'"}],
            max_tokens=10,
            seed=seed,
            extra_body=extra,
        )
        assert reply.choices[0].message.content in choices


def test_guided_regex_output_fully_matches(smollm: Server) -> None:
    pattern = r"[A-Z]{2}-\d{3,5}(-[a-z]+)?"
    client = smollm.client()
    for seed in range(3):
        chat = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Invent a product code."}],
            max_tokens=24,
            seed=seed,
            extra_body={"nvext": {"guided_regex": pattern}},
        )
        assert re.fullmatch(pattern, chat.choices[0].message.content or ""), chat.choices[0].message.content
        completion = client.completions.create(
            model=MODEL, prompt="Product code:", max_tokens=24, seed=seed, extra_body={"guided_regex": pattern}
        )
        assert re.fullmatch(pattern, completion.choices[0].text), completion.choices[0].text


def test_guided_grammar_gbnf_on_completions(smollm: Server) -> None:
    grammar = 'root ::= answer "." \nanswer ::= "yes" | "no" | "maybe"'
    reply = smollm.client().completions.create(
        model=MODEL,
        prompt="Will it rain tomorrow? Answer:",
        max_tokens=8,
        extra_body={"nvext": {"guided_grammar": grammar}},
    )
    assert reply.choices[0].text in ("yes.", "no.", "maybe.")


def _error(response: httpx.Response) -> dict[str, str | None]:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    return error


@pytest.mark.parametrize(
    ("schema", "named"),
    [
        ({"type": "object", "properties": {"a": {"type": "strin"}}}, "strin"),
        ({"type": "object", "properties": {"a": {"type": "string", "format": "email"}}}, "email"),
        ({"type": "object", "patternProperties": {"^x": {"type": "string"}}}, "patternProperties"),
        ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "uniqueItems"),
        ({"type": "string", "pattern": "(a)\\1"}, "backreference"),
        ({"type": "object", "properties": {"a": {"$ref": "https://example.com/s.json"}}}, "$ref"),
    ],
)
def test_unsupported_or_invalid_schema_is_400_naming_it(smollm: Server, schema: dict, named: str) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "x"}],
        "max_tokens": 4,
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
    }
    error = _error(httpx.post(f"{smollm.v1}/chat/completions", json=body, timeout=60))
    assert named in str(error["message"])
    assert str(error["param"]).startswith("response_format")


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"nvext": {"guided_grammar": "root ::= undefined-rule"}}, "nvext.guided_grammar"),
        ({"guided_grammar": 'root ::= root "a"'}, "guided_grammar"),
        ({"guided_regex": "(?<=a)b"}, "guided_regex"),
        ({"guided_regex": "([a-z]"}, "guided_regex"),
        ({"guided_json": "{not json"}, "guided_json"),
        ({"guided_choice": []}, "guided_choice"),
        ({"guided_regex": "a+", "guided_choice": ["a"]}, "guided_choice"),
    ],
)
def test_invalid_guides_are_400(smollm: Server, extra: dict, param: str) -> None:
    body = {"model": MODEL, "prompt": "x", "max_tokens": 4, **extra}
    error = _error(httpx.post(f"{smollm.v1}/completions", json=body, timeout=60))
    assert error["param"] == param
