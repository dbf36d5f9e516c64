"""Derive one GGUF from another with llama.cpp's own quantizer: another precision of the same weights.

A quantized file can be turned into a wider one (``F16``, ``BF16``) or another quantization (``Q8_0``): llama.cpp
dequantizes each tensor and writes it in the target type, keeping the metadata (tokenizer, chat template). Going
wider does not restore what quantization lost, but it does change which kernels run: a small model's Q4_1 file
can answer worse than the same weights run in F16, so the wider file is worth its size.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Final

from microserve.catalog.store import sha256_file

# The targets worth deriving, by the names GGUF file types and profile quantizations use; llama.cpp's
# `enum llama_ftype` has them as LLAMA_FTYPE_MOSTLY_<name> (F32 as LLAMA_FTYPE_ALL_F32).
FTYPES: Final[tuple[str, ...]] = ("F32", "F16", "BF16", "Q8_0")


class DerivationError(Exception):
    """llama.cpp could not derive the file (unreadable source, unknown type, disk full)."""


def ftype_of(name: str) -> int:
    """llama.cpp's ftype number for a type name such as ``F16``; raises DerivationError for others."""
    import llama_cpp

    upper = name.upper()
    if upper not in FTYPES:
        raise DerivationError(f"cannot derive type `{name}`; known: {', '.join(FTYPES)}")
    return int(getattr(llama_cpp, "LLAMA_FTYPE_ALL_F32" if upper == "F32" else f"LLAMA_FTYPE_MOSTLY_{upper}"))


def derive_gguf(source: Path, target: Path, ftype: str | int, *, threads: int | None = None) -> str:
    """Write ``source``'s weights to ``target`` as ``ftype`` (a name in FTYPES or llama.cpp's number) and return
    the new file's sha256.

    The file is written beside ``target`` under a temporary name and renamed into place only when complete, so a
    reader never sees half a file and a failure leaves nothing behind. ``threads`` defaults to llama.cpp's choice.
    """
    import llama_cpp

    code = ftype_of(ftype) if isinstance(ftype, str) else ftype
    if not source.is_file():
        raise DerivationError(f"cannot derive from {source}: no such file")
    with source.open("rb") as handle:
        if handle.read(4) != b"GGUF":
            raise DerivationError(f"cannot derive from {source}: not a GGUF file")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = code
    # The source is already quantized: without this llama.cpp refuses to touch it.
    params.allow_requantize = True
    params.nthread = threads or 0
    try:
        status = llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), ctypes.byref(params))
        if status != 0 or not tmp.is_file():
            raise DerivationError(f"llama.cpp could not derive {target.name} from {source} (status {status})")
        digest = sha256_file(tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return digest
