"""A failing llama_decode becomes a 500 in OpenAI's shape for the requests in that batch; the server lives on.

llama.cpp is made to fail on purpose by wrapping ``llama_decode`` in this process, with the real app served by a
real uvicorn on loopback: no client input can make a healthy llama.cpp fail, but the error path must still hold.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import httpx
import llama_cpp
import pytest
import uvicorn
from conftest import free_port, wait_ready

from microserve.server.app import build_app
from microserve.settings import Settings

MODEL = "smollm2-135m-instruct"


class FlakyDecode:
    """``llama_decode`` that fails while ``failing`` is set: with llama.cpp's error status, or by raising."""

    def __init__(self) -> None:
        self.real = llama_cpp.llama_decode
        self.failing = False
        self.raising = False

    def __call__(self, ctx: Any, batch: Any) -> int:
        if self.raising:
            raise ValueError("NULL pointer access")
        return -1 if self.failing else int(self.real(ctx, batch))


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, FlakyDecode]]:
    flaky = FlakyDecode()
    patch = pytest.MonkeyPatch()
    patch.setattr(llama_cpp, "llama_decode", flaky)
    settings = Settings(model=[MODEL], parallel=2, port=free_port(), embedding_model="none")
    server = uvicorn.Server(uvicorn.Config(build_app(settings), port=settings.port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{settings.port}"
    wait_ready(url, 120)
    yield url, flaky
    server.should_exit = True
    thread.join(timeout=30)
    patch.undo()


def chat(url: str, **extra: object) -> httpx.Response:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 8, **extra}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)


def test_engine_failure_is_a_500_and_the_server_keeps_serving(served: tuple[str, FlakyDecode]) -> None:
    url, flaky = served
    flaky.failing = True
    try:
        response = chat(url)
        assert response.status_code == 500
        error = response.json()["error"]
        assert error["type"] == "internal_server_error" and "llama_decode failed" in error["message"]

        streamed = httpx.post(
            f"{url}/v1/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8, "stream": True},
            timeout=60,
        )
        # Headers went out before the failure: the stream carries the error event instead of [DONE].
        assert streamed.status_code == 200
        assert "llama_decode failed" in streamed.text and "[DONE]" not in streamed.text
    finally:
        flaky.failing = False
    assert httpx.get(f"{url}/v1/health/live", timeout=5).status_code == 200
    ok = chat(url)
    assert ok.status_code == 200, ok.text
    assert ok.json()["usage"]["completion_tokens"] > 0


def test_an_exception_on_the_engine_thread_fails_the_request_instead_of_hanging(
    served: tuple[str, FlakyDecode],
) -> None:
    url, flaky = served
    flaky.raising = True
    try:
        response = chat(url)
    finally:
        flaky.raising = False
    assert response.status_code == 500
    assert "ValueError" in response.json()["error"]["message"]
    assert chat(url).status_code == 200
