"""PEFT -> GGUF LoRA conversion on tiny llama and gemma3 models built here from a config.

The converted tensors are checked against the math (PEFT's own merged weight delta, in llama.cpp's row order) and
against what llama.cpp's ``convert_lora_to_gguf.py`` from the pinned llama-cpp-python sdist writes for the same
adapter (bit for bit).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFReader, GGUFWriter
from peft import LoraConfig, get_peft_model

from microserve.catalog.peft_gguf import (
    AdapterError,
    BaseFacts,
    check_lora,
    convert_peft,
    permute_rows,
    read_lora,
)

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
REPO = Path(__file__).resolve().parents[2]


def tiny_model(arch: str) -> torch.nn.Module:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    common = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2)
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(**common, num_attention_heads=4, num_key_value_heads=2))
    return Gemma3ForCausalLM(Gemma3TextConfig(**common, num_attention_heads=4, num_key_value_heads=2, head_dim=16))


def make_adapter(tmp: Path, arch: str, **lora: object) -> tuple[Path, Path, torch.nn.Module]:
    """A base directory and a PEFT adapter with random (non-zero) A and B."""
    model = tiny_model(arch)
    base = tmp / f"base-{arch}"
    model.save_pretrained(base)
    options: dict[str, object] = {"r": 4, "lora_alpha": 8, "target_modules": ALL, "init_lora_weights": False}
    options.update(lora)
    peft_model = get_peft_model(model, LoraConfig(**options))  # type: ignore[arg-type]
    adapter = tmp / f"lora-{arch}"
    peft_model.save_pretrained(adapter)
    return base, adapter, peft_model


def facts(base: Path) -> BaseFacts:
    return BaseFacts.from_hf_config(json.loads((base / "config.json").read_text()))


def tensors(path: Path) -> dict[str, np.ndarray]:
    return {t.name: np.array(t.data) for t in GGUFReader(str(path)).tensors}


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize(
    "lora",
    [{}, {"use_rslora": True}, {"rank_pattern": {"q_proj": 8}, "alpha_pattern": {"down_proj": 2.0}}],
    ids=["plain", "rslora", "patterns"],
)
def test_delta_matches_peft_merge_in_llamacpp_row_order(tmp_path: Path, arch: str, lora: dict[str, object]) -> None:
    base, adapter, peft_model = make_adapter(tmp_path, arch, **lora)
    before = {k: v.clone() for k, v in peft_model.base_model.model.state_dict().items() if "base_layer" in k}
    merged = peft_model.merge_and_unload().state_dict()
    out = tmp_path / "adapter.gguf"
    info = convert_peft(adapter, out, facts(base), out_type="f32")
    stored = tensors(out)
    config = json.loads((base / "config.json").read_text())
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output"}
    names |= {"gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
    checked = 0
    for key, original in before.items():
        module = key.split(".")[-3]
        block = int(key.split(".")[2])
        delta = (merged[key.replace(".base_layer", "")] - original).numpy()
        if arch == "llama" and module in ("q_proj", "k_proj"):
            delta = permute_rows(delta, heads if module == "q_proj" else kv)
        target = f"blk.{block}.{names[module]}.weight"
        a, b = stored[target + ".lora_a"], stored[target + ".lora_b"]
        rank = b.shape[1]
        # llama.cpp computes scale * (B @ A) with scale = alpha / rank (llama-adapter.h).
        applied = (info.alpha / rank) * (b @ a)
        np.testing.assert_allclose(applied, delta, rtol=1e-4, atol=1e-6)
        checked += 1
    assert checked == 2 * len(ALL)


def test_permutation_is_not_the_identity() -> None:
    rows = np.arange(16, dtype=np.float32).reshape(16, 1)
    permuted = permute_rows(rows, 2)
    assert not np.array_equal(permuted, rows)
    # head 0 holds rows 0-7: its halves (0-3, 4-7) are interleaved.
    assert permuted[:8, 0].tolist() == [0, 4, 1, 5, 2, 6, 3, 7]


@pytest.mark.parametrize("out_type, types", [("f32", ["F32"]), ("f16", ["F16"]), ("q8_0", ["F16", "Q8_0"])])
def test_tensor_types_and_metadata(tmp_path: Path, out_type: str, types: list[str]) -> None:
    base, adapter, _ = make_adapter(tmp_path, "llama")
    out = tmp_path / "adapter.gguf"
    info = convert_peft(adapter, out, facts(base), out_type=out_type, name="zephyr")  # type: ignore[arg-type]
    # Q8_0 needs rows that are a multiple of 32: lora_a's rows (64 inputs) are, lora_b's (rank 4) fall back to F16.
    assert info.types == types
    again = read_lora(out)
    assert (again.architecture, again.alpha, again.rank, again.name) == ("llama", 8.0, 4, "zephyr")
    assert len(again.tensors) == 2 * len(ALL)
    first = again.tensors["blk.0.attn_q.weight"]
    assert first.a_shape == (64, 4) and first.b_shape == (4, 64)
    reader = GGUFReader(str(out))
    assert reader.fields["general.type"].contents() == "adapter"
    assert reader.fields["adapter.type"].contents() == "lora"


def _sdist_converter() -> Path:
    sys.path.insert(0, str(REPO / "bench"))
    try:
        from peers import _fetch_source, cache_root, pinned_version
    finally:
        sys.path.pop(0)
    version = pinned_version()
    base = cache_root() / f"llama.cpp-{version}"
    base.mkdir(parents=True, exist_ok=True)
    return _fetch_source(version, base, lambda message: None) / "convert_lora_to_gguf.py"


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_same_tensors_as_llamacpp_converter(tmp_path: Path, arch: str) -> None:
    base, adapter, _ = make_adapter(tmp_path, arch)
    script = _sdist_converter()
    for out_type in ("f32", "q8_0"):
        reference = tmp_path / f"reference-{out_type}.gguf"
        subprocess.run(
            [
                sys.executable,
                str(script),
                "--base",
                str(base),
                "--outtype",
                out_type,
                "--outfile",
                str(reference),
                str(adapter),
            ],
            check=True,
            capture_output=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
            timeout=300,
        )
        ours = tmp_path / f"ours-{out_type}.gguf"
        convert_peft(adapter, ours, facts(base), out_type=out_type)  # type: ignore[arg-type]
        want = {t.name: t for t in GGUFReader(str(reference)).tensors}
        got = {t.name: t for t in GGUFReader(str(ours)).tensors}
        assert sorted(got) == sorted(want)
        for name, tensor in want.items():
            assert got[name].tensor_type == tensor.tensor_type, name
            assert list(got[name].shape) == list(tensor.shape), name
            assert np.array_equal(np.array(got[name].data), np.array(tensor.data)), name
        ref_fields = GGUFReader(str(reference)).fields
        our_fields = GGUFReader(str(ours)).fields
        for key in ("general.architecture", "general.type", "adapter.type", "adapter.lora.alpha"):
            assert our_fields[key].contents() == ref_fields[key].contents(), key


def _edit_config(adapter: Path, **changes: object) -> None:
    path = adapter / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize(
    "changes, reason",
    [
        ({"use_dora": True}, "DoRA"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"peft_type": "IA3"}, "only LoRA"),
        ({"bias": "all"}, "biases"),
    ],
)
def test_unsupported_configs_are_refused(tmp_path: Path, changes: dict[str, object], reason: str) -> None:
    base, adapter, _ = make_adapter(tmp_path, "llama")
    _edit_config(adapter, **changes)
    with pytest.raises(AdapterError, match=reason):
        convert_peft(adapter, tmp_path / "out.gguf", facts(base))
    assert not (tmp_path / "out.gguf").exists()


def test_unsupported_modules_and_architectures_are_refused(tmp_path: Path) -> None:
    base, adapter, _ = make_adapter(tmp_path, "llama", target_modules=["q_proj", "lm_head"])
    with pytest.raises(AdapterError, match="output head"):
        convert_peft(adapter, tmp_path / "out.gguf", facts(base))
    qwen = {"model_type": "qwen2", "num_attention_heads": 4, "num_hidden_layers": 2}
    with pytest.raises(AdapterError, match=r"qwen2.*not supported"):
        BaseFacts.from_hf_config(qwen)
    other = BaseFacts("qwen2", 2, 4, 4)
    with pytest.raises(AdapterError, match="qwen2"):
        convert_peft(make_adapter(tmp_path / "b", "llama")[1], tmp_path / "out.gguf", other)


def test_a_dora_adapter_built_by_peft_is_refused(tmp_path: Path) -> None:
    base, adapter, _ = make_adapter(tmp_path, "llama", use_dora=True)
    with pytest.raises(AdapterError, match="DoRA"):
        convert_peft(adapter, tmp_path / "out.gguf", facts(base))


def _base_gguf(path: Path, arch: str, shapes: dict[str, tuple[int, int]]) -> Path:
    writer = GGUFWriter(str(path), arch)
    writer.add_block_count(2)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    for name, (n_in, n_out) in shapes.items():
        writer.add_tensor(name, np.zeros((n_out, n_in), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_check_against_a_base_gguf(tmp_path: Path) -> None:
    base, adapter, _ = make_adapter(tmp_path, "llama", target_modules=["q_proj", "v_proj"])
    out = tmp_path / "adapter.gguf"
    info = convert_peft(adapter, out, facts(base))
    right = {f"blk.{i}.{t}.weight": (64, n) for i in range(2) for t, n in (("attn_q", 64), ("attn_v", 32))}
    good = BaseFacts.from_gguf(_base_gguf(tmp_path / "good.gguf", "llama", right))
    assert (good.architecture, good.block_count, good.head_count, good.head_count_kv) == ("llama", 2, 4, 2)
    check_lora(info, good)
    with pytest.raises(AdapterError, match="rank 4 is over the limit of 2"):
        check_lora(info, good, max_rank=2)
    wrong = {k: (128, v[1]) for k, v in right.items()}
    with pytest.raises(AdapterError, match="another base model"):
        check_lora(info, BaseFacts.from_gguf(_base_gguf(tmp_path / "wrong.gguf", "llama", wrong)))
    with pytest.raises(AdapterError, match="`llama` model, the base model is `gemma3`"):
        check_lora(info, BaseFacts.from_gguf(_base_gguf(tmp_path / "gemma.gguf", "gemma3", right)))
    # Converting straight against the base GGUF checks the shapes too.
    with pytest.raises(AdapterError, match="another base model"):
        convert_peft(adapter, tmp_path / "x.gguf", BaseFacts.from_gguf(tmp_path / "wrong.gguf"))


def test_corrupt_files_are_clear_errors(tmp_path: Path) -> None:
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all")
    with pytest.raises(AdapterError, match="not a readable GGUF"):
        read_lora(junk)
    base, adapter, _ = make_adapter(tmp_path, "llama")
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: len(weights.read_bytes()) // 2])
    with pytest.raises(AdapterError, match="truncated or corrupt"):
        convert_peft(adapter, tmp_path / "out.gguf", facts(base))
    model = _base_gguf(tmp_path / "model.gguf", "llama", {"blk.0.attn_q.weight": (64, 64)})
    with pytest.raises(AdapterError, match="not an adapter"):
        read_lora(model)


def test_fast_index_agrees_with_gguf_reader() -> None:
    from microserve.catalog.gguf_index import GgufFormatError, read_index
    from microserve.catalog.manifest import find_builtin
    from microserve.catalog.store import ModelStore
    from microserve.settings import Settings

    manifest = find_builtin("smollm2-135m-instruct")
    assert manifest is not None
    path = ModelStore(Settings().cache_dir).ensure(manifest)
    index = read_index(path, arrays=("tokenizer.ggml.token_type",))
    reader = GGUFReader(str(path))
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        if key == "tokenizer.ggml.token_type":
            assert index.fields[key] == list(field.contents())
        elif len(field.types) == 1:  # scalars and strings; other arrays are skipped
            assert index.fields[key] == field.contents(), key
        else:
            assert index.fields[key] is None
    assert {n: t.shape for n, t in index.tensors.items()} == {
        t.name: tuple(int(d) for d in t.shape) for t in reader.tensors
    }
    assert {n: t.type_id for n, t in index.tensors.items()} == {t.name: int(t.tensor_type) for t in reader.tensors}
    with pytest.raises(GgufFormatError):
        read_index(Path(__file__))
