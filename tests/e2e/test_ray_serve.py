"""microserve itself on Ray Serve: two replicas of the default models, one thread each, on a local Ray head with
2 CPUs, used through Ray's HTTP proxy with the real openai client."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="the Ray Serve application needs the `ray` extra")

import openai  # noqa: E402

from microserve.scale.ray_app import REPLICA_HEADER, RayServeOptions, build_application  # noqa: E402
from microserve.settings import Settings  # noqa: E402

SRC = Path(__file__).resolve().parent.parent.parent / "src"
MODEL = "smollm2-135m-instruct"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def client() -> Iterator[openai.OpenAI]:
    from ray import serve

    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": str(SRC)}})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = build_application(Settings(threads=1, parallel=8), RayServeOptions(replicas=2, num_cpus=1))
        serve.run(app, name="microserve", route_prefix="/")
        yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
    finally:
        serve.shutdown()
        ray.shutdown()


def test_chat_streaming_and_embeddings_through_the_proxy(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say hello."}], max_tokens=8, temperature=0
    )
    assert reply.choices[0].message.content
    assert reply.usage is not None and reply.usage.completion_tokens > 0
    pieces = [
        chunk.choices[0].delta.content or ""
        for chunk in client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Count to five."}], max_tokens=12, stream=True
        )
        if chunk.choices
    ]
    assert len(pieces) > 3 and "".join(pieces)
    embedding = client.embeddings.create(model="all-minilm-l6-v2", input=["a lighthouse", "a harbour"])
    assert len(embedding.data) == 2 and len(embedding.data[0].embedding) == 384
    models = {m.id for m in client.models.list()}
    assert MODEL in models
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])


def test_conversations_stay_on_their_replica_and_reuse_the_cache(client: openai.OpenAI) -> None:
    homes: dict[int, set[str]] = {}
    later_turns, cached_turns = 0, 0
    for c in range(8):
        messages = [{"role": "system", "content": f"Conversation {c}. You answer questions about the sea briefly."}]
        for t in range(3):
            messages.append({"role": "user", "content": f"Question {t}: what is tide number {t + c}? Explain well."})
            raw = client.chat.completions.with_raw_response.create(
                model=MODEL, messages=messages, max_tokens=24, temperature=0
            )
            homes.setdefault(c, set()).add(raw.headers[REPLICA_HEADER.decode()])
            reply = raw.parse()
            if t > 0:
                later_turns += 1
                assert reply.usage is not None and reply.usage.prompt_tokens_details is not None
                cached_turns += (reply.usage.prompt_tokens_details.cached_tokens or 0) > 0
            messages.append({"role": "assistant", "content": reply.choices[0].message.content or ""})
    assert all(len(replicas) == 1 for replicas in homes.values()), homes
    assert len(set.union(*homes.values())) == 2, homes
    assert cached_turns >= 0.9 * later_turns, (cached_turns, later_turns)
