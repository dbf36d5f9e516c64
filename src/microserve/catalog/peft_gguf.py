"""Hugging Face PEFT LoRA adapters -> GGUF LoRA files that llama.cpp loads with ``llama_adapter_lora_init``.

The layout llama.cpp expects (the one its ``convert_lora_to_gguf.py`` writes):

- metadata ``general.architecture`` (the base model's, checked at load), ``general.type = "adapter"``,
  ``adapter.type = "lora"``, ``adapter.lora.alpha`` (float32) and ``general.quantization_version``;
- per adapted weight ``blk.N.<tensor>.weight`` two tensors, ``blk.N.<tensor>.weight.lora_a`` holding PEFT's
  ``lora_A.weight`` as it is (rank x in_features) and ``...lora_b`` holding ``lora_B.weight`` (out_features x rank),
  neither transposed: ggml's ``mul_mat(b, mul_mat(a, x))`` then computes ``B @ A @ x``;
- llama.cpp scales the product by ``alpha / rank`` (rank = lora_b's inner size), which is PEFT's plain scaling;
  rsLoRA, ``rank_pattern`` and ``alpha_pattern`` are folded into lora_b so that the product still comes out right;
- llama GGUFs store q/k projections with their rows permuted for llama.cpp's RoPE layout (transformers undoes the
  permutation when it loads a GGUF), so lora_b of ``q_proj``/``k_proj`` gets the same row permutation; lora_a,
  which acts on the input side, is untouched. Gemma 3 has no such permutation.

Tensor types: F32, F16, or Q8_0 for tensors whose rows are a multiple of 32 values (Q8_0's block), F16 for the
others (lora_b's rows are ``rank`` long), as llama.cpp's converter does.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from microserve.catalog.errors import CatalogError

OutType = Literal["f32", "f16", "q8_0"]

SUPPORTED_ARCHITECTURES = ("llama", "gemma3")

# PEFT module name -> GGUF tensor, for the projections of a decoder block (identical for llama and gemma3).
MODULES: dict[str, str] = {
    "q_proj": "attn_q",
    "k_proj": "attn_k",
    "v_proj": "attn_v",
    "o_proj": "attn_output",
    "gate_proj": "ffn_gate",
    "up_proj": "ffn_up",
    "down_proj": "ffn_down",
}

_LORA_TENSOR = re.compile(
    r"^(?:base_model\.model\.)?(?:model\.)?(?:language_model\.)?(?:model\.)?layers\.(?P<block>\d+)\."
    r"(?:self_attn|mlp)\.(?P<module>\w+?)\.lora_(?P<part>[AB])(?:\.[\w-]+)?\.weight$"
)
_SAFETENSORS_DTYPES: dict[str, Any] = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "BF16": np.uint16}
_Q8_0_BLOCK = 32


class AdapterError(CatalogError):
    """An adapter cannot be converted or served; the message says why, for that adapter alone."""


class AdapterMissing(AdapterError):
    """Nothing is at the path an adapter was asked from."""


class AdapterOutside(AdapterError):
    """An adapter path that leaves the adapter directory."""


@dataclass(frozen=True, slots=True)
class BaseFacts:
    """What the conversion and the checks need to know of the base model."""

    architecture: str
    block_count: int
    head_count: int
    head_count_kv: int
    # GGUF tensor name -> (ne0, ne1) = (in_features, out_features); empty when only a config is known.
    tensor_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    name: str | None = None

    @classmethod
    def from_gguf(cls, path: Path) -> BaseFacts:
        """Facts of a base model GGUF file (its header and tensor index; no weights are read)."""
        from microserve.catalog.gguf_index import GgufFormatError, read_index

        try:
            index = read_index(path)
        except (OSError, GgufFormatError) as exc:
            raise AdapterError(f"cannot read the base model {path}: {exc}") from exc
        return cls.from_fields(index.fields, {n: t.shape for n, t in index.tensors.items()}, path)

    @classmethod
    def from_fields(cls, fields: dict[str, Any], shapes: dict[str, tuple[int, ...]], path: Path) -> BaseFacts:
        """Facts from a GGUF's metadata values and tensor shapes."""
        arch = fields.get("general.architecture")
        if not arch:
            raise AdapterError(f"{path} names no architecture")
        arch = str(arch)

        def number(key: str) -> int:
            value = fields.get(f"{arch}.{key}")
            if value is None:
                raise AdapterError(f"{path} lacks {arch}.{key}")
            return int(value)

        heads = number("attention.head_count")
        kv = fields.get(f"{arch}.attention.head_count_kv")
        name = fields.get("general.name")
        return cls(
            architecture=arch,
            block_count=number("block_count"),
            head_count=heads,
            head_count_kv=int(kv) if kv is not None else heads,
            tensor_shapes=dict(shapes),
            name=str(name) if name else None,
        )

    @classmethod
    def from_hf_config(cls, config: dict[str, Any]) -> BaseFacts:
        """Facts from a Hugging Face ``config.json`` (a multimodal config's ``text_config`` is used when present)."""
        text = {**config, **config.get("text_config", {})}
        model_type = str(text.get("model_type", ""))
        arch = {"llama": "llama", "gemma3_text": "gemma3", "gemma3": "gemma3"}.get(model_type)
        if arch is None:
            raise AdapterError(
                f"base model type `{model_type or 'unknown'}` is not supported for adapters "
                f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        heads = int(text["num_attention_heads"])
        return cls(
            architecture=arch,
            block_count=int(text["num_hidden_layers"]),
            head_count=heads,
            head_count_kv=int(text.get("num_key_value_heads") or heads),
            name=config.get("_name_or_path") or None,
        )


@dataclass(frozen=True, slots=True)
class LoraTensor:
    """One adapted weight of a GGUF LoRA: shapes in ggml order (ne0 first), and the stored types."""

    a_shape: tuple[int, ...]
    b_shape: tuple[int, ...]
    a_type: str
    b_type: str

    @property
    def rank(self) -> int:
        """The inner size of B @ A (lora_b's ne0), the rank llama.cpp scales by."""
        return self.b_shape[0]


@dataclass(frozen=True, slots=True)
class LoraInfo:
    """What a GGUF LoRA file says about itself."""

    architecture: str
    alpha: float
    tensors: dict[str, LoraTensor]
    name: str | None = None
    base_model: str | None = None

    @property
    def rank(self) -> int:
        """The largest rank over the adapted weights."""
        return max((t.rank for t in self.tensors.values()), default=0)

    @property
    def types(self) -> list[str]:
        """The tensor types present (F32, F16, Q8_0)."""
        return sorted({t.a_type for t in self.tensors.values()} | {t.b_type for t in self.tensors.values()})


@dataclass(frozen=True, slots=True)
class PeftConfig:
    """The parts of ``adapter_config.json`` the conversion uses."""

    rank: int
    alpha: float
    rslora: bool
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    base_model: str | None


def read_peft_config(adapter_dir: Path) -> PeftConfig:
    """Read and check ``adapter_config.json``; features llama.cpp cannot apply are refused with the reason."""
    path = adapter_dir / "adapter_config.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise AdapterError(f"{adapter_dir} has no adapter_config.json") from exc
    except (OSError, ValueError) as exc:
        raise AdapterError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise AdapterError(f"{path} is not a JSON object")
    peft_type = str(raw.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise AdapterError(f"PEFT type {peft_type} is not supported: only LoRA adapters can be served")
    if raw.get("use_dora"):
        raise AdapterError("DoRA adapters (use_dora) are not supported: llama.cpp applies plain LoRA only")
    if raw.get("modules_to_save"):
        raise AdapterError(
            f"modules_to_save ({', '.join(map(str, raw['modules_to_save']))}) is not supported: "
            "llama.cpp adapters carry low-rank deltas only, not replaced modules"
        )
    if raw.get("bias", "none") != "none" or raw.get("lora_bias"):
        raise AdapterError("LoRA adapters with trained biases are not supported")
    if raw.get("fan_in_fan_out"):
        raise AdapterError("fan_in_fan_out adapters (GPT-2 style Conv1D) are not supported")
    if raw.get("target_parameters"):
        raise AdapterError("target_parameters (LoRA on raw parameters) is not supported")
    for key in ("use_qalora", "alora_invocation_tokens", "invocation_string"):
        if raw.get(key):
            raise AdapterError(f"`{key}` adapters are not supported")
    try:
        rank = int(raw["r"])
        alpha = float(raw["lora_alpha"])
    except (KeyError, TypeError, ValueError) as exc:
        raise AdapterError(f"{path} needs a numeric `r` and `lora_alpha`") from exc
    if rank < 1 or not alpha > 0 or not math.isfinite(alpha):
        raise AdapterError(f"{path}: r must be at least 1 and lora_alpha positive (got r={rank}, alpha={alpha})")
    return PeftConfig(
        rank=rank,
        alpha=alpha,
        rslora=bool(raw.get("use_rslora")),
        rank_pattern={str(k): int(v) for k, v in (raw.get("rank_pattern") or {}).items()},
        alpha_pattern={str(k): float(v) for k, v in (raw.get("alpha_pattern") or {}).items()},
        base_model=raw.get("base_model_name_or_path") or None,
    )


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    # PEFT's rule: a pattern key applies to a module whose full name ends with it (as a regex).
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    return (raw.astype(np.uint32) << 16).view(np.float32)


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file as a float32 array (F32, F16, BF16 and F64 are accepted)."""
    try:
        with path.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > 100 * 1024 * 1024:
                raise AdapterError(f"{path} has an implausible header ({length} bytes)")
            header = json.loads(handle.read(length))
            payload = handle.read()
    except FileNotFoundError as exc:
        raise AdapterError(f"{path.parent} has no {path.name}") from exc
    except (OSError, ValueError, struct.error) as exc:
        raise AdapterError(f"{path} is not a safetensors file: {exc}") from exc
    tensors: dict[str, np.ndarray] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        dtype = _SAFETENSORS_DTYPES.get(meta.get("dtype"))
        if dtype is None:
            raise AdapterError(f"{path}: tensor {name} has unsupported dtype {meta.get('dtype')}")
        start, end = meta["data_offsets"]
        shape = tuple(int(n) for n in meta["shape"])
        if end > len(payload) or end - start != int(np.prod(shape)) * np.dtype(dtype).itemsize:
            raise AdapterError(f"{path} is truncated or corrupt at tensor {name}")
        array = np.frombuffer(payload, dtype=dtype, count=int(np.prod(shape)), offset=start).reshape(shape)
        tensors[name] = _bf16_to_f32(array) if meta["dtype"] == "BF16" else array.astype(np.float32)
    return tensors


def permute_rows(rows: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's row order of a q/k projection: within each head, the two rotary halves are interleaved."""
    out = rows.shape[0]
    if out % (2 * heads):
        raise AdapterError(f"cannot permute {out} rows over {heads} heads")
    return rows.reshape(heads, 2, out // heads // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


@dataclass(slots=True)
class _Pair:
    path: str
    a: np.ndarray | None = None
    b: np.ndarray | None = None


def collect_pairs(tensors: dict[str, np.ndarray], base: BaseFacts) -> dict[tuple[int, str], _Pair]:
    """PEFT tensors grouped by (block, module); anything that is not a supported LoRA pair is refused."""
    pairs: dict[tuple[int, str], _Pair] = {}
    for name, array in tensors.items():
        if "lora_magnitude_vector" in name:
            raise AdapterError("DoRA adapters are not supported: llama.cpp applies plain LoRA only")
        if "lora_embedding" in name or "embed_tokens" in name or "lm_head" in name:
            raise AdapterError(f"tensor {name}: LoRA on the embeddings or the output head is not supported")
        if "modules_to_save" in name or ".base_layer." in name:
            raise AdapterError(f"tensor {name} replaces part of the base model; only LoRA deltas are supported")
        match = _LORA_TENSOR.match(name)
        if match is None:
            raise AdapterError(
                f"tensor {name} is not a LoRA weight of a supported module "
                f"(supported: {', '.join(MODULES)} in the decoder blocks)"
            )
        module = match["module"]
        if module not in MODULES:
            raise AdapterError(f"target module `{module}` is not supported (supported: {', '.join(MODULES)})")
        block = int(match["block"])
        if block >= base.block_count:
            raise AdapterError(f"tensor {name} adapts block {block}, but the base model has {base.block_count}")
        if array.ndim != 2:
            raise AdapterError(f"tensor {name} should be a matrix, has shape {array.shape}")
        pair = pairs.setdefault((block, module), _Pair(name.removeprefix("base_model.model.").split(".lora_")[0]))
        if match["part"] == "A":
            pair.a = array
        else:
            pair.b = array
    for (block, module), pair in pairs.items():
        if pair.a is None or pair.b is None:
            raise AdapterError(f"layer {block} {module} has only one of lora_A and lora_B")
        if pair.a.shape[0] != pair.b.shape[1]:
            raise AdapterError(f"layer {block} {module}: lora_A is {pair.a.shape} but lora_B is {pair.b.shape}")
    if not pairs:
        raise AdapterError("the adapter holds no LoRA weights")
    return pairs


def _encode(array: np.ndarray, out_type: OutType) -> tuple[np.ndarray, Any]:
    from gguf import GGMLQuantizationType, quants

    if out_type == "f32":
        return np.ascontiguousarray(array, dtype=np.float32), GGMLQuantizationType.F32
    if out_type == "q8_0" and array.shape[-1] % _Q8_0_BLOCK == 0:
        qtype = GGMLQuantizationType.Q8_0
        return quants.quantize(np.ascontiguousarray(array, dtype=np.float32), qtype), qtype
    return np.ascontiguousarray(array, dtype=np.float16), GGMLQuantizationType.F16


def convert_peft(
    adapter_dir: Path,
    out_path: Path,
    base: BaseFacts,
    *,
    out_type: OutType = "f32",
    name: str | None = None,
) -> LoraInfo:
    """Convert the PEFT adapter in ``adapter_dir`` for ``base`` into a GGUF LoRA at ``out_path``.

    The file is written next to ``out_path`` and renamed into place, so a reader never sees half of it.
    Raises :class:`AdapterError` for an adapter that llama.cpp could not apply as trained.
    """
    from gguf import GGUFWriter

    if base.architecture not in SUPPORTED_ARCHITECTURES:
        raise AdapterError(
            f"architecture `{base.architecture}` is not supported for adapters "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    config = read_peft_config(adapter_dir)
    pairs = collect_pairs(read_safetensors(adapter_dir / "adapter_model.safetensors"), base)
    # llama.cpp scales every pair by alpha / rank; the alpha written is PEFT's, and any module whose PEFT scaling
    # differs (rsLoRA, per-module rank or alpha) gets the difference folded into its lora_b.
    alpha = config.alpha
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    writer = GGUFWriter(str(tmp), base.architecture)
    try:
        writer.add_type("adapter")
        writer.add_string("adapter.type", "lora")
        writer.add_float32("adapter.lora.alpha", alpha)
        if name:
            writer.add_name(name)
        if config.base_model:
            writer.add_uint32("general.base_model.count", 1)
            writer.add_string("general.base_model.0.name", config.base_model)
        writer.add_quantization_version(2)
        for (block, module), pair in sorted(pairs.items()):
            assert pair.a is not None and pair.b is not None
            rank = pair.a.shape[0]
            wanted_alpha = float(_pattern_value(config.alpha_pattern, pair.path, config.alpha))
            wanted_rank = int(_pattern_value(config.rank_pattern, pair.path, config.rank))
            if wanted_rank != rank:
                raise AdapterError(f"layer {block} {module} has rank {rank}, its config says {wanted_rank}")
            wanted = wanted_alpha / (math.sqrt(rank) if config.rslora else rank)
            lora_b = pair.b * np.float32(wanted / (alpha / rank)) if not math.isclose(wanted, alpha / rank) else pair.b
            if base.architecture == "llama" and module in ("q_proj", "k_proj"):
                lora_b = permute_rows(lora_b, base.head_count if module == "q_proj" else base.head_count_kv)
            target = f"blk.{block}.{MODULES[module]}.weight"
            _check_shape(target, pair.a, lora_b, base)
            for suffix, array in ((".lora_a", pair.a), (".lora_b", lora_b)):
                data, qtype = _encode(array, out_type)
                writer.add_tensor(target + suffix, data, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    writer.close()
    tmp.replace(out_path)
    return read_lora(out_path)


def _check_shape(target: str, a: np.ndarray, b: np.ndarray, base: BaseFacts) -> None:
    shape = base.tensor_shapes.get(target)
    if not base.tensor_shapes:
        return
    if shape is None:
        raise AdapterError(f"the base model has no tensor {target}")
    # numpy (rows, cols) is ggml (ne1, ne0): the base weight is ne0 = in_features, ne1 = out_features.
    if shape[0] != a.shape[1] or shape[1] != b.shape[0]:
        raise AdapterError(
            f"{target}: the adapter maps {a.shape[1]} -> {b.shape[0]} features, the base model's weight "
            f"{shape[0]} -> {shape[1]} (an adapter for another base model?)"
        )


def _field(reader: Any, key: str) -> Any:
    item = reader.fields.get(key)
    if item is None or not item.data:
        return None
    return item.contents()


def read_lora(path: Path) -> LoraInfo:
    """Read a GGUF LoRA's metadata and tensor index; a file llama.cpp would reject raises :class:`AdapterError`."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path), "r")
    except (OSError, ValueError, IndexError, struct.error) as exc:
        raise AdapterError(f"{path} is not a readable GGUF file: {exc}") from exc
    kind = _field(reader, "general.type")
    if kind != "adapter":
        raise AdapterError(f"{path} is not an adapter (general.type is {kind!r}, expected 'adapter')")
    if _field(reader, "adapter.type") != "lora":
        raise AdapterError(f"{path} is not a LoRA adapter (adapter.type is {_field(reader, 'adapter.type')!r})")
    arch = _field(reader, "general.architecture")
    if not arch:
        raise AdapterError(f"{path} names no architecture")
    halves: dict[str, dict[str, Any]] = {}
    for tensor in reader.tensors:
        for suffix in (".lora_a", ".lora_b"):
            if tensor.name.endswith(suffix):
                halves.setdefault(tensor.name.removesuffix(suffix), {})[suffix] = tensor
                break
        else:
            if not tensor.name.endswith("_norm.weight"):
                raise AdapterError(f"{path}: tensor {tensor.name} is neither a lora_a nor a lora_b")
    tensors: dict[str, LoraTensor] = {}
    for target, parts in sorted(halves.items()):
        if len(parts) != 2:
            raise AdapterError(f"{path}: {target} has only one of lora_a and lora_b")
        a, b = parts[".lora_a"], parts[".lora_b"]
        a_shape = tuple(int(n) for n in a.shape)
        b_shape = tuple(int(n) for n in b.shape)
        if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[1] != b_shape[0]:
            raise AdapterError(f"{path}: {target} has lora_a {a_shape} and lora_b {b_shape}, which do not chain")
        tensors[target] = LoraTensor(a_shape, b_shape, a.tensor_type.name, b.tensor_type.name)
    if not tensors:
        raise AdapterError(f"{path} holds no LoRA tensors")
    alpha = _field(reader, "adapter.lora.alpha")
    name = _field(reader, "general.name")
    base_model = _field(reader, "general.base_model.0.name")
    return LoraInfo(
        architecture=str(arch),
        alpha=float(alpha) if alpha is not None else 0.0,
        tensors=tensors,
        name=str(name) if name else None,
        base_model=str(base_model) if base_model else None,
    )


def check_lora(info: LoraInfo, base: BaseFacts, *, max_rank: int | None = None) -> None:
    """Raise :class:`AdapterError` unless ``info`` applies to ``base`` the way llama.cpp checks it (and more)."""
    if info.architecture != base.architecture:
        raise AdapterError(f"the adapter is for a `{info.architecture}` model, the base model is `{base.architecture}`")
    if max_rank is not None and info.rank > max_rank:
        raise AdapterError(f"the adapter's rank {info.rank} is over the limit of {max_rank}")
    if not base.tensor_shapes:
        return  # a base known from its config only: the shapes are checked when the GGUF is loaded
    for target, tensor in info.tensors.items():
        shape = base.tensor_shapes.get(target)
        if shape is None:
            raise AdapterError(f"the adapter changes {target}, which the base model does not have")
        if shape[0] != tensor.a_shape[0] or shape[1] != tensor.b_shape[1]:
            raise AdapterError(
                f"{target}: the adapter maps {tensor.a_shape[0]} -> {tensor.b_shape[1]} features, the base "
                f"model's weight {shape[0]} -> {shape[1]} (an adapter for another base model?)"
            )
