"""Bad input gets an OpenAI error body with the right status, and the server keeps serving."""

from __future__ import annotations

import httpx
import openai
import pytest
from conftest import Server

MODEL = "smollm2-135m-instruct"


def assert_openai_error(response: httpx.Response, status: int) -> dict[str, object]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    return error


def chat_body(**overrides: object) -> dict[str, object]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, **overrides}


def test_unknown_model_is_404(smollm: Server) -> None:
    response = httpx.post(f"{smollm.v1}/chat/completions", json=chat_body(model="nope"), timeout=30)
    error = assert_openai_error(response, 404)
    assert error["code"] == "model_not_found" and MODEL in str(error["message"])
    with pytest.raises(openai.NotFoundError):
        smollm.client().completions.create(model="nope", prompt="x")


def test_bad_json_is_400(smollm: Server) -> None:
    response = httpx.post(
        f"{smollm.v1}/chat/completions",
        content=b'{"model": "smollm2-135m-instruct", "messages": [',
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert_openai_error(response, 400)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_tokens", -1),
        ("max_tokens", 0),
        ("temperature", 5),
        ("top_p", -0.5),
        ("messages", []),
        ("messages", [{"role": "wizard", "content": "x"}]),
        ("stop", ["a", "b", "c", "d", "e"]),
    ],
)
def test_bad_field_values_are_400_naming_the_field(smollm: Server, field: str, value: object) -> None:
    response = httpx.post(f"{smollm.v1}/chat/completions", json=chat_body(**{field: value}), timeout=30)
    error = assert_openai_error(response, 400)
    assert str(error["param"]).startswith(field)


def test_over_long_prompt_is_400_with_both_numbers(smollm: Server) -> None:
    long_text = "hello " * 5000
    response = httpx.post(
        f"{smollm.v1}/completions", json={"model": MODEL, "prompt": long_text, "max_tokens": 100}, timeout=30
    )
    error = assert_openai_error(response, 400)
    assert error["code"] == "context_length_exceeded"
    assert "4096" in str(error["message"]) and "100" in str(error["message"])
    with pytest.raises(openai.BadRequestError):
        smollm.client().chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": long_text}], max_tokens=10
        )


def test_prompt_plus_max_tokens_over_context_is_400(smollm: Server) -> None:
    response = httpx.post(f"{smollm.v1}/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 5000})
    error = assert_openai_error(response, 400)
    assert "5000" in str(error["message"]) and "4096" in str(error["message"])


def test_unknown_route_and_method_are_openai_errors(smollm: Server) -> None:
    assert_openai_error(httpx.get(f"{smollm.v1}/nothing-here"), 404)
    assert_openai_error(httpx.get(f"{smollm.v1}/chat/completions"), 405)


def test_server_still_answers_after_errors(smollm: Server) -> None:
    for body in (b"{", b"[]", b'"x"', b"null", b'{"model": 3}'):
        httpx.post(f"{smollm.v1}/chat/completions", content=body, headers={"content-type": "application/json"})
    reply = smollm.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4
    )
    assert reply.choices[0].message.content
    assert httpx.get(f"{smollm.url}/health").status_code == 200
