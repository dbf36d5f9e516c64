"""SIGTERM drains: streams in flight finish, new requests get 503, and the process exits 0."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path

import httpx
from conftest import Server, start_server

MODEL = "smollm2-135m-instruct"


def test_sigterm_finishes_streams_in_flight_refuses_new_work_and_exits_0(tmp_path: Path) -> None:
    server = start_server(tmp_path, "--parallel", "4", "--drain-timeout", "120")
    try:
        check_drain(server, MODEL)
    finally:
        server.stop()


def check_drain(server: Server, model: str) -> None:
    """Four streams in flight at SIGTERM finish whole; meanwhile new work gets 503 and readiness says 503 while
    liveness says 200; then the process exits 0 (also run on the vLLM engine)."""

    async def main() -> tuple[list[tuple[str | None, int]], httpx.Response, httpx.Response, httpx.Response]:
        client = server.async_client(timeout=180)
        flowing = [asyncio.Event() for _ in range(4)]

        async def stream(i: int) -> tuple[str | None, int]:
            chunks = await client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": f"Count to a hundred, attempt {i}."}],
                max_tokens=96,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"ignore_eos": True},
            )
            finish: str | None = None
            tokens = 0
            async for chunk in chunks:
                if chunk.choices and chunk.choices[0].delta.content:
                    flowing[i].set()
                if chunk.choices and chunk.choices[0].finish_reason:
                    finish = chunk.choices[0].finish_reason
                if chunk.usage:
                    tokens = chunk.usage.completion_tokens
            return finish, tokens

        streams = [asyncio.create_task(stream(i)) for i in range(4)]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in flowing)), timeout=120)
        server.process.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.5)
        async with httpx.AsyncClient(base_url=server.v1, timeout=30) as http:
            refused = await http.post(
                "/chat/completions",
                json={"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
            )
            ready = await http.get("/health/ready")
            live = await http.get("/health/live")
        # The 503s above came while the four streams were still being served.
        assert not any(task.done() for task in streams)
        results = await asyncio.gather(*streams)
        await client.close()
        return results, refused, ready, live

    results, refused, ready, live = asyncio.run(main())
    assert results == [("length", 96)] * 4
    assert refused.status_code == 503
    assert refused.json()["error"]["type"] == "service_unavailable"
    assert ready.status_code == 503
    assert live.status_code == 200
    assert server.process.wait(timeout=120) == 0
    log = server.log.read_text()
    assert "draining 4 in-flight request(s)" in log


def test_at_the_drain_timeout_streams_end_with_an_error_event_and_the_log_tells_the_truth(tmp_path: Path) -> None:
    server = start_server(tmp_path, "--parallel", "2", "--drain-timeout", "2", "--embedding-model", "none")
    try:

        async def main() -> tuple[list[dict[str, object]], bool, httpx.Response, float]:
            async with httpx.AsyncClient(base_url=server.v1, timeout=120) as http:
                streaming = asyncio.Event()
                events: list[dict[str, object]] = []
                done = False

                async def stream() -> None:
                    nonlocal done
                    body = {
                        "model": MODEL,
                        "prompt": "Count to ten thousand:",
                        "max_tokens": 3000,
                        "ignore_eos": True,
                        "stream": True,
                    }
                    async with http.stream("POST", "/completions", json=body) as response:
                        assert response.status_code == 200
                        async for line in response.aiter_lines():
                            if line == "data: [DONE]":
                                done = True
                            elif line.startswith("data: "):
                                events.append(json.loads(line[len("data: ") :]))
                                streaming.set()

                task = asyncio.create_task(stream())
                await asyncio.wait_for(streaming.wait(), timeout=120)
                unary = asyncio.create_task(
                    http.post(
                        "/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 3000, "ignore_eos": True}
                    )
                )
                await asyncio.sleep(0.5)
                server.process.send_signal(signal.SIGTERM)
                signalled = time.monotonic()
                # The body ends cleanly (no protocol error from httpx), after an error event.
                await asyncio.wait_for(task, timeout=60)
                return events, done, await unary, signalled

        events, done, unary, signalled = asyncio.run(main())
        assert server.process.wait(timeout=30) == 0
        assert time.monotonic() - signalled < 2 + 5 + 5
        assert not done
        assert events[-1] == {
            "error": {
                "message": "The server is shutting down: the request was cut off at the end of the drain timeout.",
                "type": "service_unavailable",
                "param": None,
                "code": "shutting_down",
            }
        }
        assert len(events) > 2  # tokens flowed before the cut
        assert unary.status_code == 503 and unary.json()["error"]["code"] == "shutting_down"
        log = server.log.read_text()
        assert "any still running after 2s are cut off, and the process exits within 7s" in log
        assert "drain timeout (2s): cut off 2 request(s) still in flight" in log
    finally:
        server.stop()
