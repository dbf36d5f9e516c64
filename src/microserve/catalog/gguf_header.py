"""What a GGUF file says about itself: architecture, trained context length, chat template, quantization."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True, slots=True)
class GgufHeader:
    """The header facts a synthesized manifest needs."""

    name: str | None
    architecture: str | None
    context_length: int | None
    chat_template: str | None
    file_type: str


def _value(reader: Any, key: str) -> Any:
    field = reader.fields.get(key)
    if field is None or not field.data:
        return None
    return field.contents()


def read_header(path: Path) -> GgufHeader:
    """Read ``path``'s GGUF metadata (memory-mapped; tensor data is not read)."""
    from gguf import GGUFReader, LlamaFileType

    reader = GGUFReader(str(path), "r")
    arch = _value(reader, "general.architecture")
    ctx = _value(reader, f"{arch}.context_length") if arch else None
    ftype = _value(reader, "general.file_type")
    try:
        file_type = LlamaFileType(int(ftype)).name.removeprefix("MOSTLY_") if ftype is not None else "unknown"
    except ValueError:
        file_type = f"type{ftype}"
    return GgufHeader(
        name=_value(reader, "general.name"),
        architecture=str(arch) if arch else None,
        context_length=int(ctx) if ctx is not None else None,
        chat_template=_value(reader, "tokenizer.chat_template"),
        file_type=file_type,
    )
