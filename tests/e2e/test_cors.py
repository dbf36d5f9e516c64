"""CORS with API keys: preflights from allowed origins are answered before the key check, other origins get no CORS
headers, and cross-origin requests still need the key (which Anthropic's routes also take as x-api-key)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import pytest
from conftest import Server, start_server

MODEL = "smollm2-135m-instruct"
KEY = "sk-cors"
ALLOWED = "https://app.example"


@pytest.fixture(scope="module")
def browser_facing(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_server(
        Path(tmp_path_factory.mktemp("cors")),
        "--parallel",
        "1",
        "--embedding-model",
        "none",
        "--cors-allow-origins",
        ALLOWED,
        "--cors-allow-headers",
        "authorization",
        "--cors-allow-headers",
        "content-type",
        env={"MICROSERVE_API_KEYS": KEY},
    )
    yield server
    server.stop()


def preflight(server: Server, origin: str, headers: str = "authorization, content-type") -> httpx.Response:
    return httpx.options(
        f"{server.v1}/chat/completions",
        headers={"Origin": origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": headers},
        timeout=10,
    )


def cors_headers(response: httpx.Response) -> dict[str, str]:
    return {k: v for k, v in response.headers.items() if k.lower().startswith("access-control-")}


def test_a_preflight_from_an_allowed_origin_gets_the_headers_without_a_key(browser_facing: Server) -> None:
    reply = preflight(browser_facing, ALLOWED)
    assert reply.status_code == 204
    headers = cors_headers(reply)
    assert headers["access-control-allow-origin"] == ALLOWED
    assert "POST" in headers["access-control-allow-methods"]
    assert {"authorization", "content-type"} <= {h.strip() for h in headers["access-control-allow-headers"].split(",")}


def test_a_preflight_from_another_origin_or_for_another_header_gets_none(browser_facing: Server) -> None:
    for reply in (preflight(browser_facing, "https://evil.example"), preflight(browser_facing, ALLOWED, "x-secret")):
        assert reply.status_code == 403
        assert cors_headers(reply) == {}


def test_a_cross_origin_request_still_needs_the_key(browser_facing: Server) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    url = f"{browser_facing.v1}/chat/completions"
    refused = httpx.post(url, json=body, headers={"Origin": ALLOWED}, timeout=60)
    assert refused.status_code == 401
    assert refused.headers["access-control-allow-origin"] == ALLOWED  # so the page can read why
    served = httpx.post(url, json=body, headers={"Origin": ALLOWED, "Authorization": f"Bearer {KEY}"}, timeout=60)
    assert served.status_code == 200 and served.headers["access-control-allow-origin"] == ALLOWED
    elsewhere = httpx.post(
        url, json=body, headers={"Origin": "https://evil.example", "Authorization": f"Bearer {KEY}"}, timeout=60
    )
    assert cors_headers(elsewhere) == {}


def test_anthropic_routes_take_x_api_key_and_refuse_in_their_shape(browser_facing: Server) -> None:
    ok = anthropic.Anthropic(base_url=browser_facing.url, api_key=KEY, max_retries=0).messages.create(
        model=MODEL, max_tokens=2, messages=[{"role": "user", "content": "Hi"}]
    )
    assert ok.type == "message"
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=browser_facing.url, api_key="sk-wrong", max_retries=0).messages.create(
            model=MODEL, max_tokens=2, messages=[{"role": "user", "content": "Hi"}]
        )
    missing = httpx.post(f"{browser_facing.v1}/messages", json={}, timeout=10)
    assert missing.status_code == 401
    assert missing.json()["type"] == "error" and missing.json()["error"]["type"] == "authentication_error"
    # x-api-key is an Anthropic header: the OpenAI routes keep to Bearer.
    openai_route = httpx.get(f"{browser_facing.v1}/models", headers={"x-api-key": KEY}, timeout=10)
    assert openai_route.status_code == 401
