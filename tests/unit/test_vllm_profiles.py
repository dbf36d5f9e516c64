"""The vLLM profiles of the catalog on a sample reading of an 80 GB NVIDIA GPU and on this CPU-only machine."""

from __future__ import annotations

import pytest

from microserve.catalog.manifest import Manifest, find_builtin
from microserve.catalog.profiles import ProfileError, check_all, select_profile
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
def test_with_vllm_installed_the_gpu_profile_is_selected_on_an_80_gb_gpu() -> None:
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
        with pytest.raises(ProfileError, match="vllm"):
            select_profile(manifest, CPU_MACHINE, "vllm-cpu-f32")
