"""A long prompt arriving while streams decode is prefilled in bounded chunks: the running stream keeps going."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import Server, start_server

MODEL = "smollm2-135m-instruct"
CHUNK = 32


@pytest.fixture(scope="module")
def chunked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_server(
        Path(tmp_path_factory.mktemp("chunked")),
        "--parallel", "2", "--embedding-model", "none", "--prefill-chunk", str(CHUNK),
    )  # fmt: skip
    yield server
    server.stop()


def test_running_stream_gets_a_token_per_prompt_chunk(chunked: Server) -> None:
    arrivals: list[float] = []
    stop = threading.Event()

    def running() -> None:
        body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 1000, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{chunked.v1}/completions", json=body, timeout=300) as response:
            for line in response.iter_lines():
                if line.startswith("data: {") and '"text":""' not in line:
                    arrivals.append(time.perf_counter())
                if stop.is_set():
                    return

    stream = threading.Thread(target=running)
    stream.start()
    while len(arrivals) < 5:
        time.sleep(0.01)
    long_prompt = "Summarise this log. " + " ".join(f"Ship {i} passed the rock at dusk." for i in range(150))
    sent = time.perf_counter()
    response = httpx.post(
        f"{chunked.v1}/completions", json={"model": MODEL, "prompt": long_prompt, "max_tokens": 1}, timeout=300
    )
    answered = time.perf_counter()
    stop.set()
    stream.join(timeout=60)
    assert response.status_code == 200, response.text
    prompt_tokens = response.json()["usage"]["prompt_tokens"]
    assert prompt_tokens > 1200
    # One decode step per chunk of at most CHUNK prompt tokens, and the running stream gets a token every step;
    # a scheduler that put the whole batch (256) of prompt tokens in a step would give it only about 6.
    during = sum(1 for t in arrivals if sent <= t <= answered)
    assert during >= 0.8 * prompt_tokens / CHUNK, (during, prompt_tokens)
