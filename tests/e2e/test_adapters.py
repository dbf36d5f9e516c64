"""LoRA adapters served beside the default model: chosen by ``model``, loaded and retired while running, their
output equal to llama.cpp's own with the same adapter, isolated from each other in batches and in the prefix
cache, and bad adapters refused with their reason while the others keep serving."""

from __future__ import annotations

import asyncio
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import Server, start_server
from tiny_lora import MODEL, base_path, write_gguf_lora, write_peft_lora

from microserve.catalog.adapters import find_adapter, prepare

PROMPTS = ["The capital of France is", "Once upon a time, a small robot", "def fibonacci(n):"]
TOKENS = 24


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("loras")
    write_gguf_lora(root / "alpha", seed=0)
    write_peft_lora(root / "beta", seed=1)
    return root


@pytest.fixture(scope="module")
def server(lora_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_server(
        tmp_path_factory.mktemp("adapters"),
        "--lora-dir",
        str(lora_dir),
        "--lora-refresh-interval",
        "1",
        "--parallel",
        "12",
        "--context-length",
        "1024",
        "--embedding-model",
        "none",
    )
    yield server
    server.stop()


def gguf_of(lora_dir: Path, name: str, cache: Path) -> Path:
    """The GGUF LoRA llama.cpp loads for an adapter: the file itself, or the PEFT adapter converted here."""
    return prepare(find_adapter(lora_dir, name), base_path(), cache).gguf


def llama_cpp_completion(prompt: str, lora: Path | None, max_tokens: int = TOKENS) -> str:
    """Greedy text from llama.cpp itself (llama-cpp-python's own context, adapter applied by llama.cpp), with
    llama.cpp's default attention as llama-server and microserve run it (flash attention: llama-cpp-python's class
    turns it off unless asked, which changes the numbers enough to change a greedy pick after a few tokens)."""
    from llama_cpp import Llama

    llm = Llama(
        model_path=str(base_path()),
        lora_path=str(lora) if lora else None,
        n_ctx=1024,
        n_threads=2,
        flash_attn=True,
        verbose=False,
    )
    try:
        out = llm.create_completion(prompt, max_tokens=max_tokens, temperature=0.0, top_k=1, repeat_penalty=1.0)
        return str(out["choices"][0]["text"])  # type: ignore[index]
    finally:
        llm.close()


def complete(server: Server, model: str, prompt: str, max_tokens: int = TOKENS) -> dict:
    reply = httpx.post(
        f"{server.v1}/completions",
        json={"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0},
        timeout=120,
    )
    assert reply.status_code == 200, reply.text
    return dict(reply.json())


def test_adapters_are_listed_with_their_base_and_path(server: Server, lora_dir: Path) -> None:
    cards = {m["id"]: m for m in httpx.get(f"{server.v1}/models").json()["data"]}
    assert {"alpha", "beta", MODEL} <= set(cards)
    for name in ("alpha", "beta"):
        assert cards[name]["parent"] == MODEL
        assert Path(cards[name]["root"]) == (lora_dir / name).resolve()
    assert cards[MODEL]["parent"] is None
    meta = httpx.get(f"{server.v1}/metadata").json()
    adapters = {a["name"]: a for a in meta["adapters"]}
    assert adapters["alpha"]["format"] == "gguf" and adapters["beta"]["format"] == "peft"
    assert adapters["alpha"]["rank"] == 32 and adapters["alpha"]["alpha"] == 32.0


def test_adapter_output_differs_from_base_and_equals_llama_cpp(server: Server, lora_dir: Path, tmp_path: Path) -> None:
    for name in ("alpha", "beta"):
        lora = gguf_of(lora_dir, name, tmp_path)
        for prompt in PROMPTS:
            served = complete(server, name, prompt)["choices"][0]["text"]
            base = complete(server, MODEL, prompt)["choices"][0]["text"]
            assert served != base, (name, prompt)
            assert served == llama_cpp_completion(prompt, lora), (name, prompt)


def test_chat_with_every_feature_on_an_adapter(server: Server) -> None:
    client = server.client()
    reply = client.chat.completions.create(
        model="alpha",
        messages=[{"role": "user", "content": "Name a colour."}],
        max_tokens=12,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        n=2,
        response_format={"type": "json_object"},
    )
    assert reply.model == "alpha" and len(reply.choices) == 2
    assert reply.choices[0].logprobs is not None and reply.choices[0].logprobs.content
    stream = client.chat.completions.create(
        model="beta", messages=[{"role": "user", "content": "Hi"}], max_tokens=8, stream=True
    )
    chunks = [c for c in stream if c.choices]
    assert chunks and chunks[-1].choices[0].finish_reason in ("stop", "length")


async def _stream(client: httpx.AsyncClient, model: str, prompt: str, max_tokens: int) -> str:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }
    text = []
    async with client.stream("POST", "/v1/completions", json=body, timeout=300) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                import json

                chunk = json.loads(line[6:])
                assert "error" not in chunk, chunk
                text += [c["text"] for c in chunk["choices"]]
    return "".join(text)


@pytest.fixture(scope="module")
def q4_server(lora_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The same adapters over the shipped Q4_1 profile. Its kernels take integer dot products against activations
    quantized row by row, so a sequence's logits do not depend on what else shares its batch, and equality with solo
    runs checks isolation exactly. The default F16 profile's float kernels round by batch shape (a lone decode step
    and a batch of twelve sum in another order), so a greedy pick may differ after a few tokens with no cross-talk."""
    server = start_server(
        tmp_path_factory.mktemp("adapters-q4_1"),
        "--profile",
        "llamacpp-cpu-q4_1",
        "--lora-dir",
        str(lora_dir),
        "--parallel",
        "12",
        "--context-length",
        "1024",
        "--embedding-model",
        "none",
    )
    yield server
    server.stop()


def test_twelve_concurrent_streams_over_base_and_two_adapters_equal_their_solo_runs(q4_server: Server) -> None:
    server = q4_server
    jobs = [(["alpha", "beta", MODEL][i % 3], PROMPTS[i % len(PROMPTS)] + f" ({i // 3})") for i in range(12)]

    async def main() -> tuple[list[str], list[str]]:
        async with httpx.AsyncClient(base_url=server.url) as client:
            together = await asyncio.gather(*(_stream(client, m, p, 32) for m, p in jobs))
            alone = [await _stream(client, m, p, 32) for m, p in jobs]
            return list(together), alone

    before = _turn_waits(server)
    together, alone = asyncio.run(main())
    assert together == alone
    assert len({t for t, (m, _) in zip(together, jobs, strict=True) if m == "alpha"}) >= 1
    # Three adapter sets took turns: none waited more than the two others' steps, as the engine counted them.
    after = _turn_waits(server)
    turns = {le: after[le] - before.get(le, 0.0) for le in after}
    assert turns["+Inf"] > 0 and turns["2"] == turns["+Inf"], turns
    assert turns["1"] < turns["+Inf"], turns  # the sets did wait for each other


def _turn_waits(server: Server) -> dict[str, float]:
    """Cumulative counts of ``lora_turn_wait_steps`` of the base model by bucket."""
    text = httpx.get(f"{server.v1}/metrics").text
    found = re.findall(r"^lora_turn_wait_steps_bucket\{(.*)\} ([0-9.e+]+)$", text, re.MULTILINE)
    buckets = {}
    for labels, value in found:
        if f'model_name="{MODEL}"' in labels:
            buckets[re.search(r'le="([^"]+)"', labels).group(1)] = float(value)  # type: ignore[union-attr]
    return buckets


def test_prefix_cache_is_reused_only_under_the_same_adapter(server: Server, lora_dir: Path, tmp_path: Path) -> None:
    prompt = "Here is a long shared introduction that every request sends first. " * 12 + "Now answer:"
    expected = {
        "alpha": llama_cpp_completion(prompt, gguf_of(lora_dir, "alpha", tmp_path), 12),
        "beta": llama_cpp_completion(prompt, gguf_of(lora_dir, "beta", tmp_path), 12),
        MODEL: llama_cpp_completion(prompt, None, 12),
    }
    for i, model in enumerate(["alpha", "beta", MODEL, "alpha"]):
        reply = complete(server, model, prompt, 12)
        assert reply["choices"][0]["text"] == expected[model], model
        cached = reply["usage"]["prompt_tokens_details"]["cached_tokens"]
        if i < 3:
            assert cached == 0, (model, cached)
        else:
            assert cached > 0.9 * reply["usage"]["prompt_tokens"], cached


def _listed(server: Server) -> set[str]:
    return {m["id"] for m in httpx.get(f"{server.v1}/models").json()["data"]}


def test_an_adapter_copied_in_is_served_and_removed_one_retires(server: Server, lora_dir: Path) -> None:
    staging = lora_dir.parent / "staging-gamma"
    write_gguf_lora(staging, seed=7)
    started = time.monotonic()
    staging.rename(lora_dir / "gamma")  # appears whole: a rename, as `microserve tune` writes adapters
    while "gamma" not in _listed(server):
        assert time.monotonic() - started < 3.0
        time.sleep(0.1)
    assert complete(server, "gamma", PROMPTS[0])["model"] == "gamma"
    assert time.monotonic() - started < 3.0

    async def remove_while_streaming() -> str:
        async with httpx.AsyncClient(base_url=server.url) as client:
            running = asyncio.create_task(_stream(client, "gamma", PROMPTS[1], 160))
            await asyncio.sleep(0.5)
            shutil.rmtree(lora_dir / "gamma")
            deadline = time.monotonic() + 5
            while "gamma" in _listed(server):
                assert time.monotonic() < deadline
                await asyncio.sleep(0.2)
            gone = await client.post(
                "/v1/completions", json={"model": "gamma", "prompt": "x", "max_tokens": 2}, timeout=30
            )
            assert gone.status_code == 404
            return await running

    text = asyncio.run(remove_while_streaming())
    assert len(text) > 100  # the running request finished its 160 tokens on the retired adapter


def test_bad_adapters_are_refused_with_their_reason_and_the_others_serve(
    server: Server, lora_dir: Path, tmp_path: Path
) -> None:
    bad = lora_dir / "corrupt"
    bad.mkdir()
    (bad / "adapter.gguf").write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 64)
    write_gguf_lora(lora_dir / "wronghead", architecture="gemma3")
    write_gguf_lora(lora_dir / "toowide", rank=64)
    time.sleep(2.5)  # two rescans
    listed = _listed(server)
    assert not {"corrupt", "wronghead", "toowide"} & listed and {"alpha", "beta"} <= listed
    log = server.log.read_text()
    assert "adapter corrupt is not served" in log
    assert "adapter wronghead is not served" in log and "gemma3" in log
    assert "adapter toowide is not served" in log and "rank 64 is over the limit of 32" in log
    for name, why in (("corrupt", "GGUF"), ("wronghead", "gemma3"), ("toowide", "rank 64")):
        reply = httpx.post(f"{server.v1}/load_lora_adapter", json={"lora_name": f"{name}2", "lora_path": name})
        assert reply.status_code == 400 and why in reply.json()["error"]["message"], reply.text
    outside = tmp_path / "outside"
    write_gguf_lora(outside)
    (lora_dir / "escape").symlink_to(outside)
    # A name that is not a plain file name, or a path with NUL, is a 400; a path that leaves the directory a 403.
    for body, status in (
        ({"lora_name": "../alpha"}, 400),
        ({"lora_name": "ok", "lora_path": "alpha\u0000"}, 400),
        ({"lora_name": "ok", "lora_path": "../../etc"}, 403),
        ({"lora_name": "ok", "lora_path": str(outside)}, 403),
        ({"lora_name": "ok", "lora_path": "escape"}, 403),
    ):
        reply = httpx.post(f"{server.v1}/load_lora_adapter", json=body)
        assert reply.status_code == status, (body, reply.text)
    missing = httpx.post(f"{server.v1}/load_lora_adapter", json={"lora_name": "nothing-here"})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "adapter_not_found", missing.text
    assert complete(server, "alpha", PROMPTS[0])["model"] == "alpha"
    for name in ("corrupt", "wronghead", "toowide", "escape"):
        path = lora_dir / name
        path.unlink() if path.is_symlink() else shutil.rmtree(path)


def test_load_and_unload_routes_need_the_key(lora_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    root = tmp_path_factory.mktemp("keyed-loras")
    write_gguf_lora(root / "delta", seed=3)
    server = start_server(
        tmp_path_factory.mktemp("keyed"),
        "--lora-dir",
        str(root / "none-yet"),
        "--embedding-model",
        "none",
        "--parallel",
        "2",
        env={"MICROSERVE_API_KEYS": "sekret"},
    )
    try:
        key = {"Authorization": "Bearer sekret"}
        body = {"lora_name": "delta", "lora_path": str(root / "delta")}
        assert httpx.post(f"{server.v1}/load_lora_adapter", json=body).status_code == 401
        # The path must lie inside the adapter directory, even with the key.
        assert httpx.post(f"{server.v1}/load_lora_adapter", json=body, headers=key).status_code == 403
        (root / "none-yet").mkdir()
        shutil.copytree(root / "delta", root / "none-yet" / "delta")
        loaded = httpx.post(f"{server.v1}/load_lora_adapter", json={"lora_name": "delta"}, headers=key)
        assert loaded.status_code == 200 and "delta" in loaded.text
        again = httpx.post(f"{server.v1}/load_lora_adapter", json={"lora_name": "delta"}, headers=key)
        assert again.status_code == 400
        listed = {m["id"] for m in httpx.get(f"{server.v1}/models", headers=key).json()["data"]}
        assert "delta" in listed
        assert httpx.post(f"{server.v1}/unload_lora_adapter", json={"lora_name": "delta"}).status_code == 401
        gone = httpx.post(f"{server.v1}/unload_lora_adapter", json={"lora_name": "delta"}, headers=key)
        assert gone.status_code == 200
        missing = httpx.post(f"{server.v1}/unload_lora_adapter", json={"lora_name": "delta"}, headers=key)
        assert missing.status_code == 404
        listed = {m["id"] for m in httpx.get(f"{server.v1}/models", headers=key).json()["data"]}
        assert "delta" not in listed
    finally:
        server.stop()
