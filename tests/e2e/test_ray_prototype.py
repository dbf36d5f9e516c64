"""The Ray Serve application on a real local Ray head (2 CPUs), with a small stand-in app on each replica:
Ray's HTTP proxy -> the ingress -> microserve's router -> replicas. Checks prefix routing, streaming, errors and a
replica killed mid-stream."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

ray = pytest.importorskip("ray", reason="the Ray Serve application needs the `ray` extra")

from microserve.scale.ray_app import RayServeOptions, build_application  # noqa: E402
from microserve.settings import Settings  # noqa: E402

HERE = Path(__file__).resolve().parent
SRC = HERE.parent.parent / "src"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    from ray import serve

    port = free_port()
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        runtime_env={"env_vars": {"PYTHONPATH": f"{SRC}:{HERE}"}},
    )
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        options = RayServeOptions(replicas=2, num_cpus=1, app_factory="ray_demo_app:demo_app", health_check_period_s=1)
        serve.run(build_application(Settings(embedding_model="none"), options), name="microserve", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def chat(client: httpx.Client, url: str, messages: list[dict[str, str]], **extra: object) -> httpx.Response:
    return client.post(f"{url}/v1/chat/completions", json={"model": "m", "messages": messages, **extra})


def test_a_conversation_stays_on_one_replica_and_conversations_spread(url: str) -> None:
    homes: dict[int, set[str]] = {}
    with httpx.Client(timeout=30) as client:
        for c in range(8):
            messages = [{"role": "system", "content": f"Conversation {c}. " + "You answer questions. " * 6}]
            for t in range(4):
                messages.append(
                    {"role": "user", "content": f"Question {t} of conversation {c}, " + "tell me more. " * 8}
                )
                response = chat(client, url, messages)
                assert response.status_code == 200, response.text
                homes.setdefault(c, set()).add(response.headers["x-replica"])
                assert response.headers["x-microserve-replica"]  # the replica names itself to the client
                messages.append({"role": "assistant", "content": "An answer that goes on for a while. " * 4})
    assert all(len(replicas) == 1 for replicas in homes.values()), homes
    assert len(set.union(*homes.values())) == 2, homes


def test_streaming_passes_through_chunk_by_chunk(url: str) -> None:
    arrivals = []
    with (
        httpx.Client(timeout=30) as client,
        client.stream(
            "POST",
            f"{url}/v1/chat/completions",
            json={
                "model": "m",
                "messages": [{"role": "user", "content": "hi"}],
                "stream": True,
                "max_tokens": 5,
                "delay": 0.3,
            },
        ) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                arrivals.append((time.monotonic(), line))
    assert arrivals[-1][1] == "data: [DONE]"
    assert [json.loads(line[6:])["choices"][0]["delta"]["content"] for _, line in arrivals[:-1]] == [
        "0 ",
        "1 ",
        "2 ",
        "3 ",
        "4 ",
    ]
    # Chunks arrive as the replica produces them, not all at the end.
    assert arrivals[4][0] - arrivals[0][0] > 0.9


def test_requests_without_a_prompt_and_bad_bodies_reach_a_replica(url: str) -> None:
    with httpx.Client(timeout=30) as client:
        assert client.get(f"{url}/pid").status_code == 200
        bad = client.post(
            f"{url}/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
        )
        assert bad.status_code == 400  # the app's own answer, relayed
        assert client.post(f"{url}/v1/completions", content=b"x" * (3 * 1024 * 1024)).status_code == 413


def test_one_scrape_has_every_replicas_metrics(url: str) -> None:
    text = httpx.get(f"{url}/v1/metrics", timeout=30).text
    samples = [line for line in text.splitlines() if line.startswith("demo_requests_total")]
    assert text.count("# TYPE demo_requests counter") == 1
    assert len(samples) == 2 and len({line.split('replica="')[1].split('"')[0] for line in samples}) == 2, text


def test_a_killed_replica_fails_its_streams_clearly_and_is_replaced(url: str) -> None:
    async def stream(client: httpx.AsyncClient, i: int) -> dict[str, object]:
        messages = [{"role": "user", "content": f"Load request {i}. " + "Go on. " * 20}]
        body = {"model": "m", "messages": messages, "stream": True, "max_tokens": 40, "delay": 0.25}
        started = time.monotonic()
        pid, chunks, error = None, 0, None
        try:
            async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
                if response.status_code != 200:
                    return {"status": response.status_code, "error": (await response.aread()).decode()}
                pid = int(response.headers["x-replica"])
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    if "error" in event:
                        error = event["error"]
                        break
                    chunks += 1
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"
        return {"status": 200, "pid": pid, "chunks": chunks, "error": error, "seconds": time.monotonic() - started}

    async def load() -> list[dict[str, object]]:
        async with httpx.AsyncClient(timeout=httpx.Timeout(60.0)) as client:
            tasks = [asyncio.create_task(stream(client, i)) for i in range(20)]
            await asyncio.sleep(2.0)
            pids = sorted({int(p) for p in await asyncio.gather(*(who(client) for _ in range(6)))})
            os.kill(pids[0], signal.SIGKILL)
            results = await asyncio.gather(*tasks)
            return [{"killed": pids[0], **r} for r in results]

    async def who(client: httpx.AsyncClient) -> int:
        return int((await client.get(f"{url}/pid")).json()["pid"])

    results = asyncio.run(load())
    killed = results[0]["killed"]
    on_killed = [r for r in results if r.get("pid") == killed]
    elsewhere = [r for r in results if r.get("pid") not in (None, killed)]
    assert on_killed, results
    for r in on_killed:
        # Cut short with an error the client can read, well before the stream would have ended (10 s).
        assert r["error"] and "replica" in json.dumps(r["error"]), r
        assert r["chunks"] < 40
        assert r["seconds"] < 30
    for r in elsewhere:
        assert r["error"] is None and r["chunks"] == 40, r
    # Ray starts a replacement; the application serves from two live replicas again.
    deadline = time.monotonic() + 90
    seen: set[int] = set()
    with httpx.Client(timeout=10) as client:
        while time.monotonic() < deadline and len(seen - {killed}) < 2:
            response = client.get(f"{url}/pid")
            if response.status_code == 200:
                seen.add(int(response.json()["pid"]))
            time.sleep(0.2)
    assert len(seen - {killed}) == 2, seen
