"""Pure logic of the Responses and Messages translations, the response store, the peers' fields, CORS and HEAD."""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from microserve.protocol.anthropic import MessagesRequest
from microserve.protocol.peer_fields import refused_field
from microserve.protocol.responses import Response, ResponseRequest
from microserve.server.cors import CorsMiddleware
from microserve.server.errors import install_error_handlers
from microserve.server.head import HeadMiddleware
from microserve.services import messages, responses
from microserve.services.responses import ResponseStore, StoredResponse


def test_peer_fields_refuse_only_values_that_change_the_output() -> None:
    assert refused_field({"mirostat": 2}) == ("mirostat", 2)
    assert refused_field({"typical_p": 0.5, "cache_prompt": True}) == ("typical_p", 0.5)
    assert refused_field({"mirostat": 0, "typical_p": 1.0, "use_beam_search": False, "samplers": "kt"}) is None
    assert refused_field({"use_beam_search": True}) == ("use_beam_search", True)
    assert refused_field({"add_generation_prompt": True, "stop_token_ids": [], "lora": None}) is None
    assert refused_field({"unheard_of": 3}) is None


def _response(i: int, text: str = "x") -> Response:
    return Response.model_validate(
        {
            "id": f"resp_{i}",
            "created_at": 0,
            "status": "completed",
            "model": "m",
            "output": [{"type": "message", "id": "msg_1", "status": "completed", "content": [{"text": text}]}],
            "parallel_tool_calls": True,
            "store": True,
            "temperature": 1.0,
            "text": {"format": {"type": "text"}},
            "tool_choice": "auto",
            "tools": [],
            "top_p": 1.0,
        }
    )


def test_the_response_store_evicts_the_oldest_by_count_and_by_bytes() -> None:
    store = ResponseStore(max_count=2, max_bytes=10_000)
    for i in range(3):
        store.put(StoredResponse(_response(i), [], []))
    assert store.get("resp_0") is None and store.get("resp_1") and store.get("resp_2") and len(store) == 2
    small = ResponseStore(max_count=100, max_bytes=1_500)
    for i in range(5):
        small.put(StoredResponse(_response(i, "y" * 300), [], []))
    assert 0 < len(small) < 5 and small.get("resp_4") is not None and small.get("resp_0") is None
    assert small.delete("resp_4") and not small.delete("resp_4")
    small.put(StoredResponse(_response(9, "z" * 5000), [], []))  # larger than the whole store: not kept
    assert small.get("resp_9") is None


def test_response_items_become_chat_turns_with_calls_on_the_assistant_turn() -> None:
    request = ResponseRequest.model_validate(
        {
            "model": "m",
            "input": [
                {"role": "user", "content": [{"type": "input_text", "text": "Weather?"}]},
                {"type": "function_call", "call_id": "c1", "name": "w", "arguments": "{}"},
                {"type": "function_call", "call_id": "c2", "name": "w", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
            ],
        }
    )
    turns = responses.chat_messages("Be brief.", responses.input_items(request))
    assert [t["role"] for t in turns] == ["system", "user", "assistant", "tool"]
    assert [c["id"] for c in turns[2]["tool_calls"]] == ["c1", "c2"]
    assert turns[3] == {"role": "tool", "tool_call_id": "c1", "content": "sunny"}


def test_anthropic_blocks_become_chat_turns_in_order() -> None:
    request = MessagesRequest.model_validate(
        {
            "model": "m",
            "max_tokens": 5,
            "system": [{"type": "text", "text": "Be brief."}],
            "messages": [
                {"role": "user", "content": "Weather?"},
                {
                    "role": "assistant",
                    "content": [
                        {"type": "thinking", "thinking": "hmm", "signature": "s"},
                        {"type": "text", "text": "Checking."},
                        {"type": "tool_use", "id": "t1", "name": "w", "input": {"city": "Paris"}},
                    ],
                },
                {
                    "role": "user",
                    "content": [
                        {"type": "tool_result", "tool_use_id": "t1", "content": [{"type": "text", "text": "sunny"}]},
                        {"type": "text", "text": "Thanks!"},
                    ],
                },
            ],
        }
    )
    turns = messages.chat_messages(request.system, request.messages)
    assert [t["role"] for t in turns] == ["system", "user", "assistant", "tool", "user"]
    assert (
        turns[2]["content"] == "Checking." and turns[2]["tool_calls"][0]["function"]["arguments"] == '{"city": "Paris"}'
    )
    assert turns[3]["content"] == "sunny" and turns[4]["content"] == "Thanks!"
    chat = messages.chat_request(request)
    assert chat.max_completion_tokens == 5


def test_response_events_open_and_close_items_and_skip_whitespace_before_a_call() -> None:
    builder = responses._EventBuilder(None)  # type: ignore[arg-type]
    events = builder.text("\n") + builder.call(0, "call_1", "w", "") + builder.call(0, None, None, '{"a": 1}')
    events += builder.text("Done.") + builder.close("completed")
    types = [e.type for e in events]
    assert types == [
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert [item.type for item in builder.output] == ["function_call", "message"]


def test_anthropic_blocks_are_numbered_as_they_open() -> None:
    blocks = messages._Blocks()
    events = blocks.text("Hi") + blocks.call(0, "w", '{"a"') + blocks.call(0, None, ": 1}") + blocks.close()
    assert [(e.type, getattr(e, "index", None)) for e in events] == [
        ("content_block_start", 0),
        ("content_block_delta", 0),
        ("content_block_stop", 0),
        ("content_block_start", 1),
        ("content_block_delta", 1),
        ("content_block_delta", 1),
        ("content_block_stop", 1),
    ]
    empty = messages._Blocks().close()
    assert [e.type for e in empty] == ["content_block_start", "content_block_stop"]


@pytest.fixture
def app() -> TestClient:
    inner = FastAPI()
    install_error_handlers(inner)

    @inner.get("/v1/models")
    async def models() -> dict[str, str]:
        return {"object": "list"}

    @inner.post("/v1/messages")
    async def messages_route() -> dict[str, str]:
        return {"type": "message"}

    inner.add_middleware(HeadMiddleware)
    inner.add_middleware(CorsMiddleware, origins=["https://a.example"], methods=["GET", "POST"], headers=["*"])
    return TestClient(inner)


def test_cors_preflight_simple_request_and_head(app: TestClient) -> None:
    ok = app.options("/v1/models", headers={"Origin": "https://a.example", "Access-Control-Request-Method": "GET"})
    assert ok.status_code == 204 and ok.headers["access-control-allow-origin"] == "https://a.example"
    put = app.options("/v1/models", headers={"Origin": "https://a.example", "Access-Control-Request-Method": "PUT"})
    assert put.status_code == 403 and "access-control-allow-origin" not in put.headers
    assert app.get("/v1/models", headers={"Origin": "https://a.example"}).headers["access-control-allow-origin"]
    assert "access-control-allow-origin" not in app.get("/v1/models", headers={"Origin": "https://b.example"}).headers
    head = app.head("/v1/models")
    assert head.status_code == 200 and head.content == b""


def test_unknown_routes_and_anthropic_routes_have_their_error_shapes(app: TestClient) -> None:
    missing = app.get("/v2/nothing").json()["error"]
    assert "GET /v2/nothing" in missing["message"] and "Anthropic" in missing["message"]
    wrong = app.get("/v1/messages")
    assert wrong.status_code == 405
    assert wrong.json()["type"] == "error" and wrong.json()["error"]["type"] == "invalid_request_error"
