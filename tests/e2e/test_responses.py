"""The Responses API through the real openai client: plain, streamed, function tools with a follow-up,
previous_response_id, JSON-schema output, retrieval and deletion."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest
from conftest import Server

MODEL = "smollm2-135m-instruct"
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Get the current weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 30}},
        "required": ["city"],
    },
}


def test_plain_response_with_instructions_and_usage(smollm: Server) -> None:
    client = smollm.client()
    response = client.responses.create(
        model=MODEL,
        instructions="Answer in one short sentence.",
        input="What is the capital of France?",
        max_output_tokens=24,
        temperature=0,
    )
    assert response.id.startswith("resp_") and response.object == "response"
    assert response.status in ("completed", "incomplete")
    message = response.output[0]
    assert message.type == "message" and message.id.startswith("msg_") and message.role == "assistant"
    assert response.output_text and "Paris" in response.output_text
    assert response.usage is not None
    assert response.usage.input_tokens > 0 and 0 < response.usage.output_tokens <= 24
    assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens
    again = client.responses.retrieve(response.id)
    assert again.id == response.id and again.output_text == response.output_text


def test_max_output_tokens_makes_an_incomplete_response(smollm: Server) -> None:
    response = smollm.client().responses.create(
        model=MODEL, input="Write a long story about a dragon.", max_output_tokens=5, temperature=0
    )
    assert response.status == "incomplete"
    assert response.incomplete_details is not None and response.incomplete_details.reason == "max_output_tokens"
    assert response.usage is not None and response.usage.output_tokens == 5


def test_streamed_response_events_in_order(smollm: Server) -> None:
    stream = smollm.client().responses.create(
        model=MODEL,
        input=[{"role": "user", "content": "Say hello to the world."}],
        max_output_tokens=16,
        temperature=0,
        stream=True,
    )
    events = list(stream)
    types = [e.type for e in events]
    assert types[:2] == ["response.created", "response.in_progress"]
    assert types[2:4] == ["response.output_item.added", "response.content_part.added"]
    assert types[-4:-1] == ["response.output_text.done", "response.content_part.done", "response.output_item.done"]
    assert types[-1] in ("response.completed", "response.incomplete")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    final = events[-1].response
    assert text and text == final.output_text
    item_id = events[2].item.id
    assert all(e.item_id == item_id for e in events if e.type.startswith("response.output_text"))
    assert final.usage is not None and final.usage.output_tokens > 0
    # A streamed response is stored like any other.
    assert smollm.client().responses.retrieve(final.id).output_text == text


def test_function_call_and_follow_up_with_its_output(smollm: Server) -> None:
    client = smollm.client()
    first = client.responses.create(
        model=MODEL,
        input="What is the weather like in Paris today?",
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice="required",
        max_output_tokens=60,
        temperature=0,
    )
    calls = [item for item in first.output if item.type == "function_call"]
    assert calls, first.output
    call = calls[0]
    assert call.name == "get_weather" and call.call_id
    arguments = json.loads(call.arguments)
    jsonschema.validate(arguments, WEATHER["parameters"])
    follow_up = client.responses.create(
        model=MODEL,
        previous_response_id=first.id,
        input=[
            {"type": "function_call_output", "call_id": call.call_id, "output": '{"temperature_c": 21, "sky": "sunny"}'}
        ],
        tools=[WEATHER],  # type: ignore[list-item]
        max_output_tokens=40,
        temperature=0,
    )
    assert follow_up.previous_response_id == first.id
    assert follow_up.output_text
    # The follow-up carried the whole conversation: the call and its output are in its prompt.
    assert follow_up.usage is not None and first.usage is not None
    assert follow_up.usage.input_tokens > first.usage.input_tokens


def test_streamed_function_call_arguments(smollm: Server) -> None:
    events = list(
        smollm.client().responses.create(
            model=MODEL,
            input="Weather in Rome?",
            tools=[WEATHER],  # type: ignore[list-item]
            tool_choice={"type": "function", "name": "get_weather"},
            max_output_tokens=60,
            temperature=0,
            stream=True,
        )
    )
    added = [e for e in events if e.type == "response.output_item.added"]
    assert added and added[0].item.type == "function_call" and added[0].item.name == "get_weather"
    arguments = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert done and done[0].arguments == arguments
    jsonschema.validate(json.loads(arguments), WEATHER["parameters"])
    assert events[-1].response.output[0].arguments == arguments


def test_previous_response_id_continues_the_conversation(smollm: Server) -> None:
    client = smollm.client()
    first = client.responses.create(
        model=MODEL, input="My name is Zorblax. Please remember it.", max_output_tokens=20, temperature=0
    )
    second = client.responses.create(
        model=MODEL, previous_response_id=first.id, input="What is my name?", max_output_tokens=20, temperature=0
    )
    # The second prompt holds the first turn, its answer and the new question.
    assert second.usage is not None and first.usage is not None
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    with pytest.raises(openai.BadRequestError) as missing:
        client.responses.create(model=MODEL, previous_response_id="resp_nope", input="Hi", max_output_tokens=4)
    assert missing.value.body["param"] == "previous_response_id"  # type: ignore[index]


def test_json_schema_text_format_validates(smollm: Server) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 30}, "country": {"type": "string", "maxLength": 30}},
        "required": ["city", "country"],
        "additionalProperties": False,
    }
    response = smollm.client().responses.create(
        model=MODEL,
        input="Name a famous city and its country.",
        text={"format": {"type": "json_schema", "name": "place", "schema": schema, "strict": True}},
        max_output_tokens=60,
        temperature=0,
    )
    jsonschema.validate(json.loads(response.output_text), schema)
    assert response.text.format.type == "json_schema"  # type: ignore[union-attr]


def test_store_false_and_delete(smollm: Server) -> None:
    client = smollm.client()
    unstored = client.responses.create(model=MODEL, input="Hi", max_output_tokens=4, store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)
    stored = client.responses.create(model=MODEL, input="Hi", max_output_tokens=4)
    items = httpx.get(f"{smollm.v1}/responses/{stored.id}/input_items", timeout=10).json()
    assert items["data"][0]["content"] == "Hi"
    deleted = httpx.delete(f"{smollm.v1}/responses/{stored.id}", timeout=10)
    assert deleted.json() == {"id": stored.id, "object": "response.deleted", "deleted": True}
    assert httpx.get(f"{smollm.v1}/responses/{stored.id}", timeout=10).status_code == 404


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": "nope", "input": "Hi"}, 404, "model"),
        ({"model": MODEL, "input": "Hi", "temperature": 3}, 400, "temperature"),
        ({"model": MODEL, "input": "Hi", "tools": [{"type": "web_search"}]}, 400, "tools[0].type"),
        (
            {"model": MODEL, "input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
            400,
            "input[0].content[0]",
        ),
        ({"model": MODEL, "input": "Hi", "text": {"format": {"type": "json_schema", "name": "x"}}}, 400, None),
    ],
)
def test_errors_are_chat_s(smollm: Server, body: dict[str, object], status: int, param: str | None) -> None:
    reply = httpx.post(f"{smollm.v1}/responses", json=body, timeout=60)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    if param is not None:
        assert error["param"] == param
