"""The one place that picks an engine class for a resolved model."""

from __future__ import annotations

from microserve.catalog.resolve import ResolvedModel
from microserve.engines.base import EncoderEngine, TextEngine
from microserve.hardware import usable_cores
from microserve.settings import Settings

# Used when neither the settings nor the profile say otherwise.
DEFAULT_PARALLEL = 8
DEFAULT_BATCH_SIZE = 256


def build_text_engine(model: ResolvedModel, settings: Settings) -> TextEngine:
    """A text engine for ``model``: explicit settings first, then the profile's engine defaults."""
    defaults = model.profile.defaults
    if model.profile.engine != "llamacpp":
        raise ValueError(
            f"profile `{model.profile.id}` of {model.manifest.id} needs the {model.profile.engine} engine, "
            "which cannot serve text in this build"
        )
    from microserve.engines.llamacpp.engine import LlamaCppConfig, LlamaCppEngine

    return LlamaCppEngine(
        LlamaCppConfig(
            path=str(model.path),
            model_id=model.name,
            parallel=settings.parallel or defaults.parallel or DEFAULT_PARALLEL,
            context_length=settings.context_length or defaults.context_length,
            threads=settings.threads or defaults.threads or usable_cores(),
            batch_size=settings.batch_size or defaults.batch_size or DEFAULT_BATCH_SIZE,
            prefill_chunk=settings.prefill_chunk,
            prefix_cache=settings.prefix_cache,
        )
    )


def build_encoder_engine(model: ResolvedModel, settings: Settings) -> EncoderEngine:
    """A sentence encoder for an embedding model or a cross-encoder (``task="ranking"``): explicit settings first,
    then the profile's engine defaults."""
    if model.profile.engine != "encoder":
        raise ValueError(
            f"profile `{model.profile.id}` of {model.manifest.id} needs the {model.profile.engine} engine, "
            "which cannot serve embeddings or ranking in this build"
        )
    from microserve.engines.encoder.engine import EncoderConfig, SentenceEncoder

    return SentenceEncoder(
        EncoderConfig(
            path=str(model.path),
            model_id=model.name,
            kind="cross-encoder" if model.task == "ranking" else "embedding",
            cache_dir=settings.cache_dir,
            threads=settings.threads or model.profile.defaults.threads or usable_cores(),
            max_batch=settings.encoder_max_batch,
            max_wait_ms=settings.encoder_max_wait_ms,
            workers=settings.encoder_workers,
        )
    )
