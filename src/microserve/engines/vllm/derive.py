"""Hugging Face weights derived from a GGUF: what vLLM needs to serve a model that ships only as a GGUF.

transformers reads a GGUF (dequantizing every tensor and rebuilding the tokenizer from the GGUF vocabulary) and
saves a Hugging Face directory: ``config.json``, ``generation_config.json``, the tokenizer files and
``model.safetensors``. The result holds the GGUF's own numbers: a Q4 GGUF gives Q4-rounded weights in the saved
dtype, not the original checkpoint, so vLLM serves the same model llama.cpp serves.

This module only writes the directory; the model store places it, records the digest of every file and verifies
them on every later load, as it does for every artifact.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

DTYPES = ("bfloat16", "float16", "float32")


class DeriveError(RuntimeError):
    """The GGUF cannot be turned into a Hugging Face directory; the message says why."""


def gguf_architecture(path: Path) -> str:
    """``general.architecture`` of a GGUF file ('' when it does not say)."""
    from gguf import GGUFReader

    field = GGUFReader(path).get_field("general.architecture")
    return str(field.contents()) if field is not None else ""


def supported_architectures() -> frozenset[str]:
    """GGUF architectures the installed transformers can load."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return frozenset(GGUF_SUPPORTED_ARCHITECTURES)


def _dense() -> dict[str, object]:
    """Keyword arguments that make transformers unpack every GGUF weight into a dense tensor: releases that can keep
    the weights in GGUF blocks (``GgufConfig``) do so by default, and such a model cannot be saved."""
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}  # older releases always dequantize
    return {"quantization_config": GgufConfig(dequantize=True)}


def derive_hf(
    gguf_path: Path,
    target: Path,
    *,
    dtype: str = "bfloat16",
    threads: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> float:
    """Write the Hugging Face directory for the GGUF at ``gguf_path`` into the new directory ``target``; return the
    seconds it took. ``dtype`` is what the weights are saved in (``bfloat16``, ``float16`` or ``float32``);
    ``threads`` bounds torch's threads; ``progress(done, 2)`` hears of the load and the save.

    Raises DeriveError with a one-line reason; ``target`` may then hold part of a model (the store removes it).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise DeriveError(f"unknown dtype {dtype!r}: use {', '.join(DTYPES)}")
    if not gguf_path.is_file():
        raise DeriveError(f"GGUF not found: {gguf_path}")
    architecture = gguf_architecture(gguf_path)
    supported = supported_architectures()
    if architecture not in supported:
        raise DeriveError(
            f"{gguf_path.name} is a {architecture or 'unknown'} model; transformers reads GGUFs of "
            f"{', '.join(sorted(supported))} only"
        )
    if threads is not None:
        torch.set_num_threads(threads)
    started = time.monotonic()
    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=getattr(torch, dtype), **_dense())
    except (ValueError, KeyError, RuntimeError, OSError, ImportError, TypeError) as exc:
        raise DeriveError(f"transformers cannot read {gguf_path.name}: {type(exc).__name__}: {exc}") from exc
    if progress is not None:
        progress(1, 2)
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
    if progress is not None:
        progress(2, 2)
    seconds = time.monotonic() - started
    log.info("derived Hugging Face weights (%s) from %s in %.1fs", dtype, gguf_path.name, seconds)
    return seconds
