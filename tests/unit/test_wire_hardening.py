"""Request shapes, the served schema, body text checks, the last-resort 500 and log lines: what a hostile or
careless client sends is refused with a 400 the schema announces, never a 500."""

from __future__ import annotations

import json
import logging

import pytest
from fastapi import FastAPI
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.testclient import TestClient

from microserve.protocol.chat import ChatCompletionRequest
from microserve.protocol.completions import CompletionRequest
from microserve.protocol.embeddings import EmbeddingRequest
from microserve.protocol.ranking import RankingRequest, RerankRequest
from microserve.server.body_text import BodyTextMiddleware, text_problem
from microserve.server.errors import UnhandledErrorMiddleware
from microserve.server.logging import TextFormatter, _bare_or_quoted
from microserve.server.openapi import install_openapi
from microserve.server.routes import openai
from microserve.services.limits import RequestLimits

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def test_explicit_null_means_the_default_where_openai_makes_a_field_nullable() -> None:
    chat = ChatCompletionRequest.model_validate({**CHAT, "stream": None, "n": None, "logprobs": None, "top_p": 0})
    assert (chat.stream, chat.n, chat.logprobs, chat.top_p) == (False, 1, False, 0.0)
    completion = CompletionRequest.model_validate(
        {"model": "m", "prompt": None, "echo": None, "max_tokens": None, "n": None, "stream": None}
    )
    assert (completion.prompt, completion.echo, completion.max_tokens, completion.n) == (None, False, 16, 1)
    schema = ChatCompletionRequest.model_json_schema()
    for name in ("stream", "n", "logprobs"):
        assert {"type": "null"} in schema["properties"][name]["anyOf"], name


@pytest.mark.parametrize(
    "extra",
    [
        {"logit_bias": {"--5": 1}},
        {"logit_bias": {"²": 1}},
        {"logit_bias": {" 5": 1}},
        {"logit_bias": {"5": 101}},
        {"stop": ["a", "b", "c", "d", "e"]},
        {"guided_choice": []},
        {"top_logprobs": 2},
        {"top_logprobs": 2, "logprobs": False},
        {"top_p": -0.1},
    ],
)
def test_the_request_model_refuses_what_the_server_refuses(extra: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate({**CHAT, **extra})


def test_top_logprobs_needs_logprobs_and_the_schema_says_so() -> None:
    assert ChatCompletionRequest.model_validate({**CHAT, "top_logprobs": 2, "logprobs": True}).top_logprobs == 2
    schema = ChatCompletionRequest.model_json_schema()
    assert schema["then"] == {"required": ["logprobs"], "properties": {"logprobs": {"const": True}}}
    bias = next(o for o in schema["properties"]["logit_bias"]["anyOf"] if o.get("type") == "object")
    assert bias["additionalProperties"] is False


@pytest.mark.parametrize("prompt", ["", [], [""]])
def test_an_empty_prompt_is_refused_by_the_model(prompt: object) -> None:
    with pytest.raises(ValidationError):
        CompletionRequest.model_validate({"model": "m", "prompt": prompt})


@pytest.mark.parametrize("value", [[[False]], [False], [True, 1], "", [], [""], [[]], [-1]])
def test_embedding_inputs_are_text_or_token_ids_never_booleans(value: object) -> None:
    with pytest.raises(ValidationError):
        EmbeddingRequest.model_validate_json(json.dumps({"model": "m", "input": value}))


def test_rerank_and_ranking_refuse_an_empty_model_query_or_passage_list() -> None:
    for body in (
        {"model": "", "query": "q", "documents": ["d"]},
        {"query": "", "documents": ["d"]},
        {"query": "q", "documents": []},
    ):
        with pytest.raises(ValidationError):
            RerankRequest.model_validate(body)
    for ranking in ({"query": {"text": ""}, "passages": [{"text": "p"}]}, {"query": {"text": "q"}, "passages": []}):
        with pytest.raises(ValidationError):
            RankingRequest.model_validate(ranking)
    assert RerankRequest.model_validate({"query": "q", "documents": ["d"]}).model is None


def test_the_served_schema_carries_the_operators_limits() -> None:
    app = FastAPI()
    app.include_router(openai.router)
    limits = RequestLimits(max_tokens=8, max_messages=5, max_stop_sequences=2, max_stop_length=7, max_n=3)
    install_openapi(app, limits)
    schemas = app.openapi()["components"]["schemas"]
    chat = schemas["ChatCompletionRequest"]["properties"]
    assert next(o for o in chat["n"]["anyOf"] if o.get("type") == "integer")["maximum"] == 3
    stop = {o["type"]: o for o in chat["stop"]["anyOf"] if o["type"] != "null"}
    assert stop["array"]["maxItems"] == 2 and stop["array"]["items"]["maxLength"] == 7
    assert stop["string"]["maxLength"] == 7
    assert chat["messages"]["maxItems"] == 5
    assert next(o for o in chat["max_tokens"]["anyOf"] if o.get("type") == "integer")["maximum"] == 8
    completion = schemas["CompletionRequest"]["properties"]
    assert next(o for o in completion["max_tokens"]["anyOf"] if o.get("type") == "integer")["maximum"] == 8
    paths = app.openapi()["paths"]
    assert "text/event-stream" in paths["/v1/chat/completions"]["post"]["responses"]["200"]["content"]


def test_text_problem_finds_lone_surrogates_and_bad_utf8_but_passes_pairs() -> None:
    assert text_problem(b'{"content": "x\\ud800y"}') is not None
    assert text_problem(b'{"content": "x\\udc00"}') is not None
    assert text_problem(b'{"content": "\\ud83d\\ude00 ok"}') is None  # an escaped emoji: a valid pair
    assert text_problem('{"content": "é ü"}'.encode()) is None
    assert text_problem(b'{"content": "\xed\xa0\x80"}') is not None  # a surrogate's raw bytes: not UTF-8
    assert text_problem(b'{"content": "\\\\ud800"}') is None  # an escaped backslash, then plain text


def _echo_app() -> Starlette:
    async def echo(request: Request) -> Response:
        return JSONResponse({"n": len(await request.body())})

    return Starlette(routes=[Route("/echo", echo, methods=["POST"])], middleware=[])


def test_body_text_middleware_answers_400_and_passes_good_bodies() -> None:
    app = BodyTextMiddleware(_echo_app())
    with TestClient(app) as client:
        bad = client.post("/echo", content=b'{"a": "\\ud800"}', headers={"content-type": "application/json"})
        assert bad.status_code == 400
        assert bad.json()["error"]["code"] == "invalid_json"
        assert bad.json()["error"]["message"].startswith("the request body is not valid JSON: ")
        good = client.post("/echo", content=b'{"a": "b"}', headers={"content-type": "application/json"})
        assert good.status_code == 200 and good.json() == {"n": 10}


def test_an_unhandled_error_is_a_500_body_and_is_not_raised_again() -> None:
    async def broken(request: Request) -> Response:
        raise ValueError("boom")

    # Inside Starlette's own last-resort handler, where build_app installs it.
    app = Starlette(routes=[Route("/", broken)], middleware=[Middleware(UnhandledErrorMiddleware)])
    # TestClient raises whatever the app raises: the middleware must answer instead (uvicorn closes the
    # keep-alive connection of an app that raises).
    with TestClient(app) as client:
        response = client.get("/")
    assert response.status_code == 500
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_log_values_from_clients_cannot_break_a_line() -> None:
    assert _bare_or_quoted("/v1/models") == "/v1/models"
    assert _bare_or_quoted("/v1/x\nfake=1") == '"/v1/x\\nfake=1"'
    assert _bare_or_quoted('a"b') == '"a\\"b"'
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "path=%s", ("/a\r\nINFO forged",), None)
    line = TextFormatter("%(levelname)s %(message)s").format(record)
    assert "\n" not in line and "\r" not in line and line.endswith("/a\\r\\nINFO forged")


def test_an_error_body_quoting_a_lone_surrogate_still_renders() -> None:
    from microserve.errors import ModelNotFound
    from microserve.server.errors import ErrorJSON

    error = ModelNotFound("m\ud800", ["smollm2-135m-instruct"])
    body = json.loads(ErrorJSON(error.body(), status_code=404).body)
    assert body["error"]["code"] == "model_not_found" and "\ud800" in body["error"]["message"]
