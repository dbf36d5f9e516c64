"""The one place that picks an engine class for a resolved model."""

from __future__ import annotations

from microserve.catalog.resolve import ResolvedModel
from microserve.engines.base import EncoderEngine, TextEngine
from microserve.settings import Settings


def build_text_engine(model: ResolvedModel, settings: Settings) -> TextEngine:
    """A text engine for ``model`` configured from ``settings`` (llama.cpp for GGUF files)."""
    from microserve.engines.llamacpp.engine import LlamaCppConfig, LlamaCppEngine

    return LlamaCppEngine(
        LlamaCppConfig(
            path=str(model.path),
            model_id=model.name,
            parallel=settings.parallel,
            context_length=settings.context_length,
            threads=settings.threads,
            batch_size=settings.batch_size,
            prefill_chunk=settings.prefill_chunk,
            prefix_cache=settings.prefix_cache,
        )
    )


def build_encoder_engine(model: ResolvedModel, settings: Settings) -> EncoderEngine:
    """A sentence encoder for an embedding model or a cross-encoder (``task="ranking"``)."""
    from microserve.engines.encoder.engine import EncoderConfig, SentenceEncoder

    return SentenceEncoder(
        EncoderConfig(
            path=str(model.path),
            model_id=model.name,
            kind="cross-encoder" if model.task == "ranking" else "embedding",
            cache_dir=settings.cache_dir,
            threads=settings.threads,
            max_batch=settings.encoder_max_batch,
            max_wait_ms=settings.encoder_max_wait_ms,
        )
    )
