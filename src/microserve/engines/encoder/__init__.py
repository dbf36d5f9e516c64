"""The sentence encoder engine: embedding models and cross-encoders on ONNX Runtime, batched across requests."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from microserve.engines.base import EncoderEngine
    from microserve.engines.registry import EngineTarget
    from microserve.settings import Settings


def build(target: EngineTarget, settings: Settings) -> EncoderEngine:
    """A sentence encoder for an embedding model or a cross-encoder (``task="ranking"``): explicit settings first,
    then the profile's engine defaults."""
    from microserve.engines.encoder.engine import EncoderConfig, SentenceEncoder
    from microserve.hardware import usable_cores

    return SentenceEncoder(
        EncoderConfig(
            path=str(target.path),
            model_id=target.name,
            kind="cross-encoder" if target.task == "ranking" else "embedding",
            cache_dir=settings.cache_dir,
            threads=settings.threads or target.threads or usable_cores(),
            max_batch=settings.encoder_max_batch,
            max_wait_ms=settings.encoder_max_wait_ms,
            workers=settings.encoder_workers,
        )
    )


def prepare(target: EngineTarget, settings: Settings) -> Path:
    """Export the model to ONNX into the cache, as the engine does on its first start; the exported file."""
    from microserve.engines.encoder.onnx_export import exported_model

    return exported_model(target.path, "cross-encoder" if target.task == "ranking" else "embedding", settings.cache_dir)
