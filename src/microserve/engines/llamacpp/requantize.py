"""Derive one GGUF from another with llama.cpp's own quantizer: another precision of the same weights.

A quantized file can be turned into a wider one (``F16``, ``BF16``) or another quantization (``Q8_0``): llama.cpp
dequantizes each tensor and writes it in the target type, keeping the metadata (tokenizer, chat template). Going
wider does not restore what quantization lost, but it does change which kernels run: a small model's Q4_1 file
can answer worse than the same weights run in F16, so the wider file is worth its size.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable
from pathlib import Path
from typing import Final

import llama_cpp as L

from microserve.engines.llamacpp.log import captured, install_log_capture, tensor_progress
from microserve.engines.registry import DerivationError
from microserve.hardware import usable_cores

# The targets worth deriving, by the names GGUF file types and profile quantizations use; llama.cpp's
# `enum llama_ftype` has them as LLAMA_FTYPE_MOSTLY_<name> (F32 as LLAMA_FTYPE_ALL_F32).
FTYPES: Final[tuple[str, ...]] = ("F32", "F16", "BF16", "Q8_0")


def ftype_of(name: str) -> int:
    """llama.cpp's ftype number for a type name such as ``F16``; raises DerivationError for others."""
    upper = name.upper()
    if upper not in FTYPES:
        raise DerivationError(f"cannot derive type `{name}`; known: {', '.join(FTYPES)}")
    return int(getattr(L, "LLAMA_FTYPE_ALL_F32" if upper == "F32" else f"LLAMA_FTYPE_MOSTLY_{upper}"))


def derive_gguf(
    source: Path,
    target: Path,
    ftype: str,
    *,
    threads: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """Write ``source``'s weights to ``target`` as ``ftype`` (a name in FTYPES).

    The file is written beside ``target`` under a temporary name and renamed into place only when complete, so a
    reader never sees half a file and a failure leaves nothing behind. ``threads`` defaults to the usable cores;
    ``progress(done, total)`` hears of each tensor. Raises DerivationError with llama.cpp's reason.
    """
    code = ftype_of(ftype)
    if not source.is_file():
        raise DerivationError(f"cannot derive from {source}: no such file")
    with source.open("rb") as handle:
        if handle.read(4) != b"GGUF":
            raise DerivationError(f"cannot derive from {source}: not a GGUF file")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.derive")
    params = L.llama_model_quantize_default_params()
    params.ftype = code
    # The source is already quantized: without this llama.cpp refuses to touch it.
    params.allow_requantize = True
    params.nthread = threads or usable_cores()
    install_log_capture()
    total = 0

    def seen(done: int, of: int) -> None:
        nonlocal total
        total = of
        if progress is not None:
            progress(done, of)

    try:
        with captured() as problems, tensor_progress(seen):
            status = L.llama_model_quantize(str(source).encode(), str(tmp).encode(), ctypes.byref(params))
        if status != 0 or not tmp.is_file():
            why = f": {problems[-1]}" if problems else ""
            raise DerivationError(f"llama.cpp could not derive {target.name} from {source} (status {status}){why}")
        if progress is not None and total:
            progress(total, total)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
