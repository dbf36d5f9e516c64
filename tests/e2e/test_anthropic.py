"""Anthropic's Messages API through the real anthropic client: plain, streamed, a tool round trip, token counts,
and errors in Anthropic's shape."""

from __future__ import annotations

import anthropic
import httpx
import jsonschema
import pytest
from conftest import Server

MODEL = "smollm2-135m-instruct"
WEATHER = {
    "name": "get_weather",
    "description": "Get the current weather in a city",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 30}},
        "required": ["city"],
    },
}


# Anthropic's SDK no longer takes `temperature`: greedy decoding is asked for in the extra body, which the server
# reads as the Messages API defines it.
def client(server: Server) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0)


def test_plain_message_with_system_and_usage(smollm: Server) -> None:
    message = client(smollm).messages.create(
        model=MODEL,
        max_tokens=30,
        system="Answer in one short sentence.",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        extra_body={"temperature": 0},
    )
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
    assert message.content[0].type == "text" and "Paris" in message.content[0].text
    assert message.stop_reason in ("end_turn", "max_tokens")
    assert message.usage.input_tokens > 0 and 0 < message.usage.output_tokens <= 30


def test_stop_sequences_report_which_one_stopped(smollm: Server) -> None:
    message = client(smollm).messages.create(
        model=MODEL,
        max_tokens=60,
        messages=[{"role": "user", "content": "Count from 1 to 20, separated by commas."}],
        stop_sequences=["7"],
        extra_body={"temperature": 0},
    )
    assert message.stop_reason == "stop_sequence" and message.stop_sequence == "7"
    assert "7" not in message.content[0].text  # type: ignore[union-attr]


def test_streamed_message_with_the_sdk_s_event_stream(smollm: Server) -> None:
    with client(smollm).messages.stream(
        model=MODEL, max_tokens=20, messages=[{"role": "user", "content": "Say hello."}], extra_body={"temperature": 0}
    ) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert pieces and "".join(pieces) == final.content[0].text  # type: ignore[union-attr]
    assert final.stop_reason in ("end_turn", "max_tokens") and final.usage.output_tokens > 0
    raw = httpx.post(
        f"{smollm.v1}/messages",
        json={"model": MODEL, "max_tokens": 5, "stream": True, "messages": [{"role": "user", "content": "Hi"}]},
        timeout=60,
    )
    names = [line[7:] for line in raw.text.splitlines() if line.startswith("event: ")]
    assert names[:3] == ["message_start", "ping", "content_block_start"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]


def test_tool_round_trip(smollm: Server) -> None:
    c = client(smollm)
    question = {"role": "user", "content": "What is the weather in Paris?"}
    first = c.messages.create(
        model=MODEL,
        max_tokens=80,
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice={"type": "any"},
        messages=[question],  # type: ignore[list-item]
        extra_body={"temperature": 0},
    )
    assert first.stop_reason == "tool_use"
    use = next(block for block in first.content if block.type == "tool_use")
    assert use.name == "get_weather" and use.id.startswith("toolu_")
    jsonschema.validate(use.input, WEATHER["input_schema"])
    result = {"type": "tool_result", "tool_use_id": use.id, "content": "Sunny and 21 degrees Celsius."}
    second = c.messages.create(
        model=MODEL,
        max_tokens=40,
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice={"type": "none"},
        messages=[question, {"role": "assistant", "content": first.content}, {"role": "user", "content": [result]}],  # type: ignore[list-item]
        extra_body={"temperature": 0},
    )
    assert second.content and second.content[0].type == "text" and second.content[0].text
    # The second prompt holds the question, the call and its result.
    alone = c.messages.count_tokens(model=MODEL, messages=[question])  # type: ignore[list-item]
    assert second.usage.input_tokens + (second.usage.cache_read_input_tokens or 0) > alone.input_tokens + 20


def test_streamed_tool_use_sends_the_input_as_json_deltas(smollm: Server) -> None:
    with client(smollm).messages.stream(
        model=MODEL,
        max_tokens=80,
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice={"type": "tool", "name": "get_weather"},
        messages=[{"role": "user", "content": "Weather in Rome?"}],
        extra_body={"temperature": 0},
    ) as stream:
        final = stream.get_final_message()
    use = next(block for block in final.content if block.type == "tool_use")
    jsonschema.validate(use.input, WEATHER["input_schema"])
    assert final.stop_reason == "tool_use"


def test_count_tokens_counts_the_rendered_prompt(smollm: Server) -> None:
    c = client(smollm)
    messages = [{"role": "user", "content": "Hello world"}]
    plain = c.messages.count_tokens(model=MODEL, messages=messages)  # type: ignore[arg-type]
    with_tools = c.messages.count_tokens(model=MODEL, messages=messages, tools=[WEATHER])  # type: ignore[arg-type,list-item]
    assert 0 < plain.input_tokens < with_tools.input_tokens
    reply = c.messages.create(model=MODEL, max_tokens=1, messages=messages)  # type: ignore[arg-type]
    assert reply.usage.input_tokens + reply.usage.cache_read_input_tokens == plain.input_tokens  # type: ignore[operator]


@pytest.mark.parametrize(
    ("body", "status", "kind"),
    [
        ({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}, 400, "invalid_request_error"),
        ({"model": "nope", "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]}, 404, "not_found_error"),
        ({"model": MODEL, "max_tokens": 4, "messages": []}, 400, "invalid_request_error"),
        (
            {
                "model": MODEL,
                "max_tokens": 4,
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "x"}}
                        ],
                    }
                ],
            },
            400,
            "invalid_request_error",
        ),
    ],
)
def test_errors_come_in_anthropic_s_shape(smollm: Server, body: dict[str, object], status: int, kind: str) -> None:
    reply = httpx.post(f"{smollm.v1}/messages", json=body, timeout=60)
    assert reply.status_code == status, reply.text
    error = reply.json()
    assert error["type"] == "error" and error["error"]["type"] == kind and error["error"]["message"]
    if "max_tokens" in body:  # the SDK itself insists on it
        with pytest.raises(anthropic.APIStatusError) as raised:
            client(smollm).messages.create(**body)  # type: ignore[arg-type]
        assert raised.value.status_code == status
