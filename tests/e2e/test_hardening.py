"""What an outside audit broke, each as its reproduction against the default service: lone surrogates, odd
logit_bias keys and the keep-alive connection after them, a stream refused after its 200, a forged log line,
explicit nulls, and requests the schema let through."""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest
from conftest import Server

MODEL = "smollm2-135m-instruct"
EMBEDDING = "all-minilm-l6-v2"


def post_raw(server: Server, path: str, body: bytes) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", content=body, headers={"content-type": "application/json"}, timeout=60)


def assert_error(response: httpx.Response, status: int) -> dict[str, object]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


SURROGATE = "\\ud800"  # a JSON escape of a lone UTF-16 surrogate, as the raw body carries it


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (
            "/v1/chat/completions",
            f'{{"model": "{MODEL}", "messages": [{{"role": "user", "content": "x{SURROGATE}y"}}]}}',
        ),
        ("/v1/completions", f'{{"model": "{MODEL}", "prompt": "x{SURROGATE}y", "max_tokens": 2}}'),
        ("/v1/chat/completions", f'{{"model": "m{SURROGATE}", "messages": [{{"role": "user", "content": "x"}}]}}'),
        ("/v1/completions", f'{{"model": "m{SURROGATE}", "prompt": "x"}}'),
        ("/v1/embeddings", f'{{"model": "m{SURROGATE}", "input": "x"}}'),
        ("/v1/chat/completions", f'{{"model": "{MODEL}", "messages": [{{"role": "user", "content": "x\\udc00"}}]}}'),
    ],
)
def test_a_lone_surrogate_anywhere_is_a_400_not_a_500(smollm: Server, path: str, body: str) -> None:
    error = assert_error(post_raw(smollm, path, body.encode()), 400)
    assert str(error["message"]).startswith("the request body is not valid JSON")


def test_raw_surrogate_bytes_are_a_400_and_a_valid_pair_is_served(smollm: Server) -> None:
    raw = b'{"model": "' + MODEL.encode() + b'", "prompt": "x\xed\xa0\x80", "max_tokens": 2}'
    assert_error(post_raw(smollm, "/v1/completions", raw), 400)
    paired = f'{{"model": "{MODEL}", "prompt": "smile \\ud83d\\ude00", "max_tokens": 2}}'
    assert post_raw(smollm, "/v1/completions", paired.encode()).status_code == 200


def _exchange(sock: socket.socket, request: bytes) -> tuple[int, bytes]:
    """Send one HTTP/1.1 request on ``sock`` and read its whole (Content-Length) reply."""
    sock.sendall(request)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
    )
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("the server closed the connection mid-body")
        body += chunk
    return int(head.split(b" ")[1]), body


def _post(body: dict[str, object], path: str = "/v1/chat/completions") -> bytes:
    data = json.dumps(body).encode()
    return (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    ).encode() + data


@pytest.mark.parametrize("key", ["--5", "²", "٣", " 5", "5 ", "0x10"])
def test_a_logit_bias_key_that_is_no_token_id_is_a_400_and_the_connection_lives_on(smollm: Server, key: str) -> None:
    host, port = smollm.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
        status, reply = _exchange(sock, _post({**body, "logit_bias": {key: 1}}))
        assert status == 400, reply
        assert json.loads(reply)["error"]["param"].startswith("logit_bias")
        # The same keep-alive connection serves the next request.
        status, reply = _exchange(sock, _post(body))
        assert status == 200, reply
        assert json.loads(reply)["choices"][0]["message"]["content"] is not None


def _metric(server: Server, name: str, labels: str) -> float:
    text = httpx.get(f"{server.v1}/metrics", timeout=30).text
    prefix = f"{name}{{{labels}}} "
    return sum(float(line[len(prefix) :]) for line in text.splitlines() if line.startswith(prefix))


def test_a_streamed_request_the_engine_would_refuse_is_a_400_before_any_stream(smollm: Server) -> None:
    aborted = _metric(smollm, "request_success_total", f'model_name="{MODEL}",finished_reason="abort"')
    for body in (
        {"model": MODEL, "prompt": "", "stream": True},
        {"model": MODEL, "prompt": ["ok", ""], "stream": True},
        {"model": MODEL, "prompt": "hi", "max_tokens": 5000, "stream": True},
    ):
        with httpx.stream("POST", f"{smollm.v1}/completions", json=body, timeout=60) as response:
            response.read()
            assert response.status_code == 400, response.text
            assert response.headers["content-type"].startswith("application/json")
    # None of them ran, so none counts as a finished (aborted) sequence.
    assert _metric(smollm, "request_success_total", f'model_name="{MODEL}",finished_reason="abort"') == aborted


def test_a_newline_in_the_path_cannot_forge_a_log_line(smollm: Server) -> None:
    marker = f"FORGED{time.monotonic_ns()}"
    forged = f"%0A2026-01-01%2000:00:00,000%20INFO%20microserve.access:%20{marker}%0D%0Ax"
    assert httpx.get(f"{smollm.v1}/models{forged}", timeout=30).status_code == 404
    deadline = time.monotonic() + 10
    while marker not in smollm.log.read_text(errors="replace") and time.monotonic() < deadline:
        time.sleep(0.1)
    lines = [line for line in smollm.log.read_text(errors="replace").splitlines() if marker in line]
    assert len(lines) == 1, lines
    assert lines[0].startswith("20") and " INFO microserve.access: request_id=" in lines[0]
    assert "\\n2026-01-01 00:00:00,000 INFO" in lines[0] and "\\r\\nx" in lines[0]


def test_explicit_nulls_mean_the_defaults(smollm: Server) -> None:
    chat = httpx.post(
        f"{smollm.v1}/chat/completions",
        json={
            "model": MODEL,
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 3,
            "stream": None,
            "n": None,
            "logprobs": None,
            "top_logprobs": None,
            "temperature": None,
            "top_p": 0,
            "stop": None,
            "seed": None,
            "logit_bias": None,
            "stream_options": None,
        },
        timeout=60,
    )
    assert chat.status_code == 200, chat.text
    assert len(chat.json()["choices"]) == 1 and chat.json()["choices"][0]["logprobs"] is None
    completion = httpx.post(
        f"{smollm.v1}/completions",
        json={
            "model": MODEL,
            "prompt": None,
            "echo": None,
            "n": None,
            "logprobs": None,
            "stream": None,
            "max_tokens": None,
        },
        timeout=60,
    )
    assert completion.status_code == 200, completion.text
    body = completion.json()
    # max_tokens null is OpenAI's default of 16; a null prompt starts a document.
    assert body["usage"]["completion_tokens"] <= 16 and body["usage"]["prompt_tokens"] == 1


def test_the_schema_states_the_limits_and_the_server_keeps_them(smollm: Server) -> None:
    schemas = httpx.get(f"{smollm.url}/openapi.json", timeout=30).json()["components"]["schemas"]
    chat = schemas["ChatCompletionRequest"]["properties"]
    assert next(o for o in chat["n"]["anyOf"] if o.get("type") == "integer")["maximum"] == 16
    response = httpx.post(
        f"{smollm.v1}/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "n": 17, "max_tokens": 1},
        timeout=30,
    )
    assert assert_error(response, 400)["param"] == "n"
    for body in (
        {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "top_logprobs": 2},
        {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "guided_choice": []},
        {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "stop": ["a", "b", "c", "d", "e"]},
    ):
        assert_error(httpx.post(f"{smollm.v1}/chat/completions", json=body, timeout=30), 400)


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/embeddings", {"model": EMBEDDING, "input": [[False]]}, "input"),
        ("/v1/embeddings", {"model": EMBEDDING, "input": [True, 2]}, "input"),
        ("/v1/embeddings", {"model": EMBEDDING, "input": ""}, "input"),
        ("/v1/rerank", {"model": "", "query": "q", "documents": ["d"]}, "model"),
        ("/v1/rerank", {"query": "", "documents": ["d"]}, "query"),
        ("/v1/ranking", {"query": {"text": "q"}, "passages": []}, "passages"),
    ],
)
def test_retrieval_requests_the_schema_refuses_are_refused(
    smollm: Server, path: str, body: dict[str, object], param: str
) -> None:
    error = assert_error(httpx.post(f"{smollm.url}{path}", json=body, timeout=30), 400)
    assert str(error["param"]).startswith(param)


def test_metadata_and_the_profiles_command_show_the_usable_cores(smollm: Server) -> None:
    cpu = httpx.get(f"{smollm.v1}/metadata", timeout=30).json()["cpu"]
    assert 1 <= cpu["usable_cores"] <= cpu["logical_cores"]
    assert "cpu_quota" in cpu
