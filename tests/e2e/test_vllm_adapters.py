"""LoRA adapters on microserve's vLLM engine: a PEFT adapter from the adapter directory is served as a model of its
own, answers as vLLM's own server does with the same adapter (``--enable-lora --lora-modules``), leaves the base
model's answers unchanged when both run at once, and can be retired and loaded again through the routes; a GGUF-only
adapter is refused with the reason. Runs in the vLLM job."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from conftest import Server, start_vllm_server
from test_vllm_parity import vllm_own_server
from tiny_lora import base_path, write_gguf_lora, write_peft_lora

pytestmark = pytest.mark.vllm

MODEL = "smollm2-135m-instruct"
PROMPTS = ("The capital of France is", "Once upon a time, a small robot", "def fibonacci(n):")
TOKENS = 24


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("vllm-loras")
    # Shapes from the packaged Q4_1 file, which the vLLM job has without deriving llama.cpp's F16.
    q4 = base_path(MODEL, "llamacpp-cpu-q4_1")
    write_peft_lora(root / "beta", seed=1, base=q4)
    write_gguf_lora(root / "alpha", seed=0, base=q4)
    return root


@pytest.fixture(scope="module")
def server(lora_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_vllm_server(
        tmp_path_factory.mktemp("vllm-lora-server"), "--parallel", "4", "--lora-dir", str(lora_dir)
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def vllm_own(server: Server, lora_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """vLLM's own OpenAI server on the same weights with the same PEFT adapter."""
    lora = ("--enable-lora", "--max-lora-rank", "32", "--lora-modules", f"beta={lora_dir / 'beta'}")
    with vllm_own_server(tmp_path_factory.mktemp("vllm-own-lora"), "--max-num-seqs", "4", *lora) as url:
        yield url


def complete(base_url: str, model: str, prompt: str) -> str:
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)
    return client.completions.create(model=model, prompt=prompt, max_tokens=TOKENS, temperature=0).choices[0].text


def test_the_peft_adapter_is_served_and_the_gguf_only_one_refused_with_its_reason(server: Server) -> None:
    listed = {m["id"]: m for m in httpx.get(f"{server.v1}/models").json()["data"]}
    assert "beta" in listed and listed["beta"]["parent"] == MODEL
    assert "alpha" not in listed
    assert "vLLM, which loads PEFT adapters" in server.log.read_text()


def test_adapter_output_differs_from_the_base_and_equals_vllm_serve(server: Server, vllm_own: str) -> None:
    for prompt in PROMPTS:
        ours = complete(server.v1, "beta", prompt)
        assert ours and ours != complete(server.v1, MODEL, prompt)
        assert ours == complete(vllm_own, "beta", prompt)


def test_base_and_adapter_streams_at_once_equal_their_solo_runs(server: Server) -> None:
    solo = {(m, p): complete(server.v1, m, p) for m in (MODEL, "beta") for p in PROMPTS[:2]}

    async def together() -> dict[tuple[str, str], str]:
        client = server.async_client()
        keys = list(solo) * 2  # eight requests over the four slots, base and adapter mixed

        async def one(model: str, prompt: str) -> str:
            reply = await client.completions.create(model=model, prompt=prompt, max_tokens=TOKENS, temperature=0)
            return reply.choices[0].text

        texts = await asyncio.gather(*(one(m, p) for m, p in keys))
        await client.close()
        for key, text in zip(keys, texts, strict=True):
            assert text == solo[key], key
        return solo

    asyncio.run(together())


def test_unload_and_load_again_through_the_routes(server: Server, lora_dir: Path) -> None:
    with httpx.Client(base_url=server.v1, timeout=120) as http:
        before = complete(server.v1, "beta", PROMPTS[0])
        assert http.post("/unload_lora_adapter", json={"lora_name": "beta"}).status_code == 200
        gone = http.post("/completions", json={"model": "beta", "prompt": PROMPTS[0], "max_tokens": 4})
        assert gone.status_code == 404
        loaded = http.post("/load_lora_adapter", json={"lora_name": "beta", "lora_path": str(lora_dir / "beta")})
        assert loaded.status_code == 200, loaded.text
        assert complete(server.v1, "beta", PROMPTS[0]) == before
        refused = http.post("/load_lora_adapter", json={"lora_name": "alpha", "lora_path": str(lora_dir / "alpha")})
        assert refused.status_code == 400
        assert "PEFT" in refused.json()["error"]["message"]
