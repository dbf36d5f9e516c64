"""Every knob of the service, in one pydantic-settings object.

Values come from (highest first): CLI flags, ``MICROSERVE_*`` environment variables, defaults.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MODEL = "smollm2-135m-instruct"


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
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log verbosity.")
    cache_dir: Path = Field(
        default_factory=_default_cache,
        validation_alias=AliasChoices("MICROSERVE_CACHE", "cache_dir"),
        description="Where model artifacts are placed and verified.",
    )

    # -- operations: API keys, admission, request limits, drain, logs, tracing, TLS ----------------------------
    # API keys come from the environment or a file only: a command-line flag would show them in `ps`.
    api_keys: SecretStr | None = Field(
        None, description="Comma-separated API keys; when set (or api_key_file is), requests need a Bearer key."
    )
    api_key_file: Path | None = Field(None, description="File with one API key or `sha256:<hex>` digest per line.")
    metrics_public: bool = Field(False, description="Serve the metrics routes without an API key.")
    max_queue: int | None = Field(
        None, ge=0, description="Requests per model waiting for a slot before 429s; default 4 x parallel."
    )
    queue_timeout: float = Field(30.0, gt=0, description="Seconds a request may wait for a slot before a 503.")
    max_body_bytes: int = Field(2 * 1024 * 1024, ge=1024, description="Largest request body accepted (413 above).")
    max_tokens_limit: int | None = Field(
        None, ge=1, description="Most completion tokens one request may ask for (and the default); else the context."
    )
    max_messages: int = Field(1024, ge=1, description="Most messages in one chat request.")
    max_stop_sequences: int = Field(4, ge=0, description="Most stop strings in one request.")
    max_stop_length: int = Field(256, ge=1, description="Longest stop string, in characters.")
    max_n: int = Field(16, ge=1, description="Largest `n` (choices per request).")
    drain_timeout: float = Field(
        30.0, ge=0, description="Seconds in-flight requests may run after SIGTERM/SIGINT before exit."
    )
    log_format: Literal["text", "json"] = Field(
        "text",
        validation_alias=AliasChoices("MICROSERVE_LOG_FORMAT", "NIM_JSONL_LOGGING", "log_format"),
        description="Log lines as text or as JSON objects (NIM_JSONL_LOGGING=1 means json).",
    )
    log_prompts: bool = Field(False, description="Include prompt text in request log lines.")
    otel_endpoint: str | None = Field(
        None,
        validation_alias=AliasChoices("OTEL_EXPORTER_OTLP_ENDPOINT", "MICROSERVE_OTEL_ENDPOINT", "otel_endpoint"),
        description="OTLP/HTTP collector; when set, each request is traced (needs the `otel` extra).",
    )
    ssl_certfile: Path | None = Field(None, description="TLS certificate (PEM); serves HTTPS when set.")
    ssl_keyfile: Path | None = Field(None, description="TLS private key (PEM).")
    ssl_ca_certs: Path | None = Field(None, description="CA bundle; when set, clients must present a certificate.")

    @field_validator("log_format", mode="before")
    @classmethod
    def _log_format(cls, value: object) -> object:
        # NIM_JSONL_LOGGING is a boolean switch; MICROSERVE_LOG_FORMAT names the format.
        if isinstance(value, str):
            lowered = value.strip().lower()
            return {"1": "json", "true": "json", "yes": "json", "0": "text", "false": "text", "no": "text"}.get(
                lowered, lowered
            )
        return value

    @property
    def queue_limit(self) -> int:
        """Waiting requests allowed per model."""
        return 4 * self.parallel if self.max_queue is None else self.max_queue

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value
