"""The one place that picks an engine class for a resolved model."""

from __future__ import annotations

from microserve.catalog.resolve import ResolvedModel
from microserve.engines.base import TextEngine
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
