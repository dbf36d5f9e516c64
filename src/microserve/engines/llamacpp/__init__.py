"""The llama.cpp engine: GGUF models on llama.cpp's C API, with continuous batching."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from microserve.engines.base import TextEngine
    from microserve.engines.registry import EngineTarget
    from microserve.settings import Settings

# Used when neither the settings nor the profile say otherwise.
DEFAULT_PARALLEL = 8
DEFAULT_BATCH_SIZE = 256


def build(target: EngineTarget, settings: Settings) -> TextEngine:
    """A llama.cpp engine for ``target``: explicit settings first, then the profile's engine defaults. Without
    either, the thread count follows the CPUs other processes leave free, up to the usable cores (threads.py)."""
    from microserve.engines.llamacpp.threads import prepare_openmp

    adaptive = settings.threads is None and target.threads is None
    if adaptive:
        prepare_openmp()  # before llama.cpp's libraries (and libgomp) load
    from microserve.engines.llamacpp.engine import LlamaCppConfig, LlamaCppEngine
    from microserve.hardware import usable_cores

    return LlamaCppEngine(
        LlamaCppConfig(
            path=str(target.path),
            model_id=target.name,
            parallel=settings.parallel or target.parallel or DEFAULT_PARALLEL,
            context_length=settings.context_length or target.context_length,
            threads=settings.threads or target.threads or usable_cores(),
            adaptive_threads=adaptive,
            batch_size=settings.batch_size or target.batch_size or DEFAULT_BATCH_SIZE,
            prefill_chunk=settings.prefill_chunk,
            prefill_step_factor=settings.prefill_step_factor,
            prefix_cache=settings.prefix_cache,
            max_loras=settings.max_loras,
        )
    )


def derive(
    source: Path,
    target: Path,
    kind: str,
    *,
    threads: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """Write the GGUF ``source`` to ``target`` as file type ``kind`` (F16, BF16, Q8_0, F32) with llama.cpp's own
    quantizer; ``progress(done, total)`` counts tensors."""
    from microserve.engines.llamacpp.requantize import derive_gguf

    derive_gguf(source, target, kind, threads=threads, progress=progress)
