"""Every knob of the service, in one pydantic-settings object.

Values come from (highest first): CLI flags, ``MICROSERVE_*`` environment variables, defaults.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_EMBEDDING_MODEL = "all-minilm-l6-v2"


def _default_cache() -> Path:
    return Path.home() / ".cache" / "microserve"


class Settings(BaseSettings):
    """Service configuration. Each field maps to ``MICROSERVE_<NAME>`` and to a ``microserve serve`` flag."""

    model_config = SettingsConfigDict(env_prefix="MICROSERVE_", extra="ignore", populate_by_name=True)

    host: str = Field("127.0.0.1", description="Address to bind.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port to listen on.")
    model: str = Field(DEFAULT_MODEL, description="A built-in model name or a path to a GGUF file.")
    served_model_name: str | None = Field(
        None, description="Name clients send as `model`; defaults to the built-in id or the file's stem."
    )
    context_length: int | None = Field(
        None, ge=16, description="Tokens per sequence (prompt + completion); default min(model's, 4096)."
    )
    parallel: int = Field(8, ge=1, le=256, description="Sequence slots decoded together in one batch.")
    threads: int | None = Field(None, ge=1, description="CPU threads for llama.cpp; default the usable cores.")
    batch_size: int = Field(
        256, ge=16, description="Most tokens in one decode step (decode tokens plus prompt chunks)."
    )
    embedding_model: str | None = Field(
        DEFAULT_EMBEDDING_MODEL,
        description="Embedding model served beside the chat model: a built-in name or a sentence-transformers "
        "directory; `none` serves no embedding model.",
    )
    rerank_model: str | None = Field(
        None, description="A sentence-transformers CrossEncoder directory served for /v1/ranking and /v1/rerank."
    )
    encoder_max_batch: int = Field(32, ge=1, le=1024, description="Most inputs in one encoder forward pass.")
    encoder_max_wait_ms: float = Field(
        5.0, ge=0.0, le=1000.0, description="How long a forward pass waits for more inputs to fill its batch."
    )
    prefill_chunk: int | None = Field(
        None,
        ge=1,
        description="Most prompt tokens per decode step while other sequences are generating. Unset, the "
        "engine sizes it from measured step times so that such a step takes at most about twice a decode-only "
        "step, which bounds the latency a long new prompt adds to running streams.",
    )
    prefix_cache: bool = Field(
        True, description="Reuse the KV cells of earlier requests that share a prompt prefix (cached_tokens)."
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log verbosity.")
    cache_dir: Path = Field(
        default_factory=_default_cache,
        validation_alias=AliasChoices("MICROSERVE_CACHE", "cache_dir"),
        description="Where model artifacts are placed and verified.",
    )

    @field_validator("embedding_model", "rerank_model", mode="before")
    @classmethod
    def _none_word(cls, value: object) -> object:
        return None if isinstance(value, str) and value.strip().lower() in ("", "none") else value

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value
