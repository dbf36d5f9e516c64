"""Small LoRA adapters for the default model, built by the tests: a GGUF LoRA written tensor by tensor with the
``gguf`` package, or a Hugging Face PEFT adapter (``adapter_config.json`` + ``adapter_model.safetensors``) written
with numpy, both with random A and B of the shapes the base model's weights have."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from microserve.catalog.gguf_index import read_index
from microserve.catalog.manifest import find_builtin
from microserve.catalog.store import ModelStore
from microserve.settings import Settings

MODEL = "smollm2-135m-instruct"
# GGUF tensor -> PEFT module, for the projections the adapters here change.
TARGETS = {"attn_q": "self_attn.q_proj", "attn_v": "self_attn.v_proj", "ffn_down": "mlp.down_proj"}


def base_path(model: str = MODEL, profile: str | None = None) -> Path:
    """The built-in model's GGUF in the model cache (placed by the first server start), of its default profile or
    of ``profile``."""
    manifest = find_builtin(model)
    assert manifest is not None
    chosen = manifest.profile(profile) if profile else None
    return ModelStore(Settings().cache_dir).path_for(manifest, chosen)


def _pairs(base: Path, rank: int, seed: int, scale: float) -> dict[tuple[int, str], tuple[np.ndarray, np.ndarray]]:
    index = read_index(base)
    rng = np.random.default_rng(seed)
    blocks = int(index.fields[f"{index.fields['general.architecture']}.block_count"])
    out: dict[tuple[int, str], tuple[np.ndarray, np.ndarray]] = {}
    for block in range(blocks):
        for target in TARGETS:
            in_features, out_features = index.tensors[f"blk.{block}.{target}.weight"].shape[:2]
            a = rng.standard_normal((rank, in_features)).astype(np.float32) / np.sqrt(in_features)
            b = rng.standard_normal((out_features, rank)).astype(np.float32) * scale
            out[(block, target)] = (a, b)
    return out


def write_gguf_lora(
    folder: Path,
    *,
    rank: int = 32,
    alpha: float = 32.0,
    seed: int = 0,
    scale: float = 0.05,
    architecture: str = "llama",
    base: Path | None = None,
) -> Path:
    """``folder/adapter.gguf``: a LoRA on q, v and down projections with Q8_0 tensors where rows allow (rank 32
    makes lora_b's rows Q8_0 too, which keeps greedy output independent of batch composition)."""
    from gguf import GGMLQuantizationType, GGUFWriter, quants

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "adapter.gguf"
    writer = GGUFWriter(str(path), architecture)
    writer.add_type("adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", alpha)
    for (block, target), (a, b) in sorted(_pairs(base or base_path(), rank, seed, scale).items()):
        for suffix, array in ((".lora_a", a), (".lora_b", b)):
            if array.shape[-1] % 32 == 0:
                data, qtype = quants.quantize(array, GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0
            else:
                data, qtype = array.astype(np.float16), GGMLQuantizationType.F16
            writer.add_tensor(f"blk.{block}.{target}.weight{suffix}", data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_peft_lora(
    folder: Path,
    *,
    rank: int = 32,
    alpha: float = 32.0,
    seed: int = 1,
    scale: float = 0.05,
    base_model: str = "HuggingFaceTB/SmolLM2-135M-Instruct",
    base: Path | None = None,
) -> Path:
    """``folder`` as a PEFT LoRA adapter directory, in Hugging Face's row order (not llama.cpp's); ``base`` is the
    GGUF whose shapes it follows (default: the built-in model's default profile in the cache)."""
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for (block, target), (a, b) in _pairs(base or base_path(), rank, seed, scale).items():
        prefix = f"base_model.model.model.layers.{block}.{TARGETS[target]}"
        tensors[f"{prefix}.lora_A.weight"] = a
        tensors[f"{prefix}.lora_B.weight"] = b
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": sorted({m.split(".")[-1] for m in TARGETS.values()}),
        "base_model_name_or_path": base_model,
        "bias": "none",
        "task_type": "CAUSAL_LM",
    }
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder
