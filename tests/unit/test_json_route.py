"""JsonBodyRoute: bodies validated from their bytes, replies serialised as the route declares."""

from __future__ import annotations

import pytest
from fastapi import APIRouter, FastAPI, Request
from fastapi.testclient import TestClient
from pydantic import BaseModel

from microserve.server.json_route import JsonBodyRoute, body_model


class Ask(BaseModel):
    text: str
    times: int = 1


class Answer(BaseModel):
    text: str
    note: str | None = None


async def repeat(body: Ask, request: Request) -> Answer:
    return Answer(text=body.text * body.times)


def app() -> FastAPI:
    router = APIRouter(route_class=JsonBodyRoute)
    router.add_api_route("/repeat", repeat, methods=["POST"], response_model=Answer, response_model_exclude_none=True)
    router.add_api_route("/created", repeat, methods=["POST"], response_model=Answer, status_code=201)
    application = FastAPI()
    application.include_router(router)
    return application


def test_the_body_is_parsed_and_the_reply_serialised_as_declared() -> None:
    client = TestClient(app())
    reply = client.post("/repeat", json={"text": "ab", "times": 2})
    assert reply.status_code == 200 and reply.json() == {"text": "abab"}  # note left out: exclude_none
    created = client.post("/created", json={"text": "x"})
    assert created.status_code == 201 and created.json() == {"text": "x", "note": None}


def test_a_bad_body_is_a_validation_error_located_in_the_body() -> None:
    client = TestClient(app())
    wrong = client.post("/repeat", json={"text": "ab", "times": "twice"})
    assert wrong.status_code == 422
    assert [e["loc"] for e in wrong.json()["detail"]] == [["body", "times"]]
    broken = client.post("/repeat", content=b'{"text": ', headers={"content-type": "application/json"})
    assert broken.status_code == 422 and broken.json()["detail"][0]["type"] == "json_invalid"


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
def test_a_body_not_sent_as_json_is_refused(content_type: str | None) -> None:
    # What a browser may send cross-site without a CORS preflight.
    headers = {"content-type": content_type} if content_type else {}
    refused = TestClient(app()).post("/repeat", content=b'{"text": "ab"}', headers=headers)
    assert refused.status_code == 422 and refused.json()["detail"][0]["loc"] == ["body"]


@pytest.mark.parametrize(
    "content_type", ["application/json; charset=utf-8", "Application/JSON", "application/vnd.x+json"]
)
def test_json_content_types_are_accepted(content_type: str) -> None:
    reply = TestClient(app()).post("/repeat", content=b'{"text": "ab"}', headers={"content-type": content_type})
    assert reply.status_code == 200 and reply.json() == {"text": "ab"}


def test_the_schema_documents_the_body() -> None:
    schema = TestClient(app()).get("/openapi.json").json()
    body = schema["paths"]["/repeat"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/Ask"}


def test_an_endpoint_must_take_a_model_and_the_request() -> None:
    assert body_model(repeat) is Ask

    async def no_request(body: Ask) -> Answer:
        return Answer(text=body.text)

    async def not_a_model(body: dict, request: Request) -> Answer:
        return Answer(text="")

    for endpoint in (no_request, not_a_model):
        with pytest.raises(TypeError):
            body_model(endpoint)
