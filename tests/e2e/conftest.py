"""End-to-end fixtures: the real server as a subprocess on a free loopback port, and the real openai client."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    """A running ``microserve serve`` process."""

    url: str
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def v1(self) -> str:
        return f"{self.url}/v1"

    def client(self, **kwargs: object) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.v1, api_key="unused", max_retries=0, **kwargs)  # type: ignore[arg-type]

    def async_client(self, **kwargs: object) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.v1, api_key="unused", max_retries=0, **kwargs)  # type: ignore[arg-type]

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def start_server(tmp: Path, *args: str, env: dict[str, str] | None = None, ready_timeout: float = 180) -> Server:
    """Start the CLI with ``args`` and wait until ``/v1/health/ready`` says 200."""
    port = free_port()
    log = tmp / f"server-{port}.log"
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    process = subprocess.Popen(
        [sys.executable, "-m", "microserve", "serve", "--port", str(port), *args],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env=full_env,
    )
    server = Server(url=f"http://127.0.0.1:{port}", process=process, log=log)
    try:
        wait_ready(server.url, ready_timeout, process, log)
    except RuntimeError:
        server.stop()
        raise
    return server


def wait_ready(
    url: str, timeout: float, process: subprocess.Popen[bytes] | None = None, log: Path | None = None
) -> None:
    """Poll ``/v1/health/ready`` until 200; raise with the log if the process exits or the time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{log.read_text() if log else ''}")
        try:
            if httpx.get(f"{url}/v1/health/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"server not ready in {timeout}s:\n{log.read_text() if log else ''}")


@pytest.fixture(scope="session")
def smollm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The default service (chat model with 8 slots plus the embedding model), shared by the tests that do not
    need a server of their own."""
    server = start_server(tmp_path_factory.mktemp("smollm"), "--parallel", "8")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def gemma(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The second built-in model, a base model served for completions."""
    server = start_server(
        tmp_path_factory.mktemp("gemma"), "--model", "gemma-3-270m", "--parallel", "4", "--embedding-model", "none"
    )
    yield server
    server.stop()


@pytest.fixture(scope="session")
def smollm_vocab(smollm: Server) -> object:
    """SmolLM2's own tokenizer through llama-cpp-python's high-level class, independent of the engine."""
    from llama_cpp import Llama

    from microserve.catalog.manifest import find_builtin
    from microserve.catalog.store import ModelStore
    from microserve.settings import Settings

    manifest = find_builtin("smollm2-135m-instruct")
    assert manifest is not None
    path = ModelStore(Settings().cache_dir).path_for(manifest)
    return Llama(str(path), vocab_only=True, verbose=False)


# vLLM's CPU build, kept small so that it starts in about a minute on two cores: no torch.compile, a 256 MiB KV
# cache, 2048-token sequences.
VLLM_PROFILE = "vllm-cpu-f32"
VLLM_ARGS = (
    "--model",
    "smollm2-135m-instruct",
    "--embedding-model",
    "none",
    "--vllm-enforce-eager",
    "--vllm-kv-cache-mb",
    "256",
    "--context-length",
    "2048",
)


def start_vllm_server(tmp: Path, *args: str, env: dict[str, str] | None = None) -> Server:
    """SmolLM2 served by microserve's vLLM engine (the vllm-cpu profile, asked for by name)."""
    return start_server(
        tmp, *VLLM_ARGS, *args, env={"MICROSERVE_PROFILE": VLLM_PROFILE, **(env or {})}, ready_timeout=900
    )


@pytest.fixture(scope="session")
def vllm_smollm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """SmolLM2 on microserve's vLLM engine with 8 sequences, shared by the vLLM tests."""
    server = start_vllm_server(tmp_path_factory.mktemp("vllm"), "--parallel", "8")
    yield server
    server.stop()
