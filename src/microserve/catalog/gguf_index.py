"""A fast look at a GGUF file: its metadata and tensor index, without parsing vocabulary arrays.

``gguf.GGUFReader`` turns every element of every array into numpy objects, which takes seconds for a model with
a 50k-token vocabulary; checking an adapter against its base model needs only a few keys and the tensor shapes.
Arrays are skipped (their values come back as None) unless their key is asked for.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_SCALARS: dict[int, str] = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_STRING, _ARRAY = 8, 9


class GgufFormatError(ValueError):
    """Not a GGUF file, or a truncated one."""


@dataclass(frozen=True, slots=True)
class TensorEntry:
    """One tensor of the index: its shape in ggml order (ne0 first) and its ggml type id."""

    shape: tuple[int, ...]
    type_id: int


@dataclass(frozen=True, slots=True)
class GgufIndex:
    """Metadata values (arrays as None unless asked for) and the tensor index."""

    fields: dict[str, Any]
    tensors: dict[str, TensorEntry]


class _Cursor:
    def __init__(self, data: mmap.mmap) -> None:
        self.data = data
        self.at = 0

    def take(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self.at + size > len(self.data):
            raise GgufFormatError("the file ends inside its header")
        (value,) = struct.unpack_from(fmt, self.data, self.at)
        self.at += size
        return value

    def string(self) -> str:
        length = self.take("<Q")
        if self.at + length > len(self.data):
            raise GgufFormatError("the file ends inside its header")
        text = bytes(self.data[self.at : self.at + length]).decode("utf-8", errors="replace")
        self.at += length
        return text

    def value(self, kind: int, keep: bool) -> Any:
        if kind in _SCALARS:
            return self.take(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            inner = self.take("<I")
            count = self.take("<Q")
            if keep:
                return [self.value(inner, True) for _ in range(count)]
            if inner in _SCALARS:
                self.at += struct.calcsize(_SCALARS[inner]) * count
            else:
                for _ in range(count):
                    self.value(inner, False)
            return None
        raise GgufFormatError(f"unknown metadata value type {kind}")


def read_index(path: Path, *, arrays: tuple[str, ...] = ()) -> GgufIndex:
    """The metadata and tensor index of ``path``; raises :class:`GgufFormatError` or ``OSError``."""
    with path.open("rb") as handle:
        try:
            data = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError as exc:  # an empty file
            raise GgufFormatError(f"{path} is empty") from exc
    with data:
        cursor = _Cursor(data)
        if len(data) < 24 or data[:4] != b"GGUF":
            raise GgufFormatError(f"{path} is not a GGUF file")
        cursor.at = 4
        version = cursor.take("<I")
        if version < 2:
            raise GgufFormatError(f"{path} is GGUF version {version}; only 2 and later are read")
        n_tensors = cursor.take("<Q")
        n_fields = cursor.take("<Q")
        fields: dict[str, Any] = {}
        for _ in range(n_fields):
            key = cursor.string()
            fields[key] = cursor.value(cursor.take("<I"), key in arrays)
        tensors: dict[str, TensorEntry] = {}
        for _ in range(n_tensors):
            name = cursor.string()
            dims = cursor.take("<I")
            shape = tuple(cursor.take("<Q") for _ in range(dims))
            type_id = cursor.take("<I")
            cursor.take("<Q")  # data offset
            tensors[name] = TensorEntry(shape, type_id)
    return GgufIndex(fields, tensors)
