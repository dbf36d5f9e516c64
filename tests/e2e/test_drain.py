"""SIGTERM drains: streams in flight finish, new requests get 503, and the process exits 0."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import httpx
from conftest import start_server

MODEL = "smollm2-135m-instruct"


def test_sigterm_finishes_streams_in_flight_refuses_new_work_and_exits_0(tmp_path: Path) -> None:
    server = start_server(tmp_path, "--parallel", "4", "--drain-timeout", "120")
    try:

        async def main() -> tuple[list[tuple[str | None, int]], httpx.Response, httpx.Response, httpx.Response]:
            client = server.async_client(timeout=180)
            flowing = [asyncio.Event() for _ in range(4)]

            async def stream(i: int) -> tuple[str | None, int]:
                chunks = await client.chat.completions.create(
                    model=MODEL,
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
                    json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
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
        assert server.process.wait(timeout=60) == 0
        log = server.log.read_text()
        assert "draining 4 in-flight request(s)" in log
    finally:
        server.stop()
