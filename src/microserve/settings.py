"""Every knob of the service, in one pydantic-settings object.

Values come from (highest first): CLI flags, ``MICROSERVE_*`` environment variables, NIM's environment names
(``NIM_*``, where the meaning is the same), defaults. docs/configuration.md lists every setting.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_EMBEDDING_MODEL = "all-minilm-l6-v2"


def _default_cache() -> Path:
    return Path.home() / ".cache" / "microserve"


def _env(name: str, *nim: str) -> AliasChoices:
    # Explicit aliases switch off the env prefix, so the MICROSERVE_ name is listed first: it wins over NIM's.
    # The bare field name stays out: it would read unprefixed variables such as PORT or MODEL. Flags still set
    # fields by name (populate_by_name).
    return AliasChoices(f"MICROSERVE_{name.upper()}", *nim)


_NIM_LOG_LEVELS = {"default": "info", "trace": "debug", "critical": "error", "warn": "warning"}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


class Settings(BaseSettings):
    """Service configuration. Each field maps to ``MICROSERVE_<NAME>`` and to a ``microserve serve`` flag."""

    model_config = SettingsConfigDict(env_prefix="MICROSERVE_", extra="ignore", populate_by_name=True)

    host: str = Field("127.0.0.1", description="Address to bind.")
    port: int = Field(8000, ge=0, le=65535, validation_alias=_env("port", "NIM_SERVER_PORT"), description="TCP port.")
    model: Annotated[list[str], NoDecode] = Field(
        [DEFAULT_MODEL],
        min_length=1,
        validation_alias=_env("model", "NIM_MODEL_NAME"),
        description="Models to serve: catalog ids, GGUF paths or hf://owner/repo/file.gguf (comma-separated in env).",
    )
    served_model_name: Annotated[list[str], NoDecode] = Field(
        [],
        validation_alias=_env("served_model_name", "NIM_SERVED_MODEL_NAME"),
        description="Names clients send as `model`, one per served model in order; default the model id.",
    )
    context_length: int | None = Field(
        None,
        ge=16,
        validation_alias=_env("context_length", "NIM_MAX_MODEL_LEN"),
        description="Tokens per sequence (prompt + completion); default the profile's, else min(model's, 4096).",
    )
    parallel: int | None = Field(
        None, ge=1, le=256, description="Sequence slots decoded together in one batch; default the profile's (8)."
    )
    threads: int | None = Field(
        None,
        ge=1,
        description="CPU threads for llama.cpp and the encoder; default the usable cores (affinity and cgroup quota).",
    )
    batch_size: int | None = Field(
        None, ge=16, description="Most tokens in one decode step; default the profile's (256)."
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", validation_alias=_env("log_level", "NIM_LOG_LEVEL"), description="Log verbosity."
    )
    log_format: Literal["text", "json"] = Field(
        "text",
        validation_alias=_env("log_format", "NIM_JSONL_LOGGING"),
        description="Log lines as text or as JSON objects, one a line.",
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
    encoder_workers: int | None = Field(
        None,
        ge=1,
        le=64,
        description="Encoder forward passes that run side by side, each on its own share of the threads "
        "(default: 2 when there are at least 2 threads).",
    )
    encoder_max_wait_ms: float = Field(
        5.0, ge=0.0, le=1000.0, description="How long a forward pass waits for more inputs to fill its batch."
    )
    prefill_chunk: int | None = Field(
        None,
        ge=1,
        description="Most prompt tokens per decode step while other sequences are generating. Unset, the "
        "engine sizes it from measured step times so that such a step takes at most about "
        "--prefill-step-factor decode-only steps (twice by default), which bounds the latency a long new "
        "prompt adds to running streams.",
    )
    prefill_step_factor: float = Field(
        2.0,
        ge=1.1,
        le=100.0,
        description="How long a decode step carrying a lone new prompt's tokens may take, in decode-only steps, "
        "when --prefill-chunk is unset. Higher admits prompts sooner and raises throughput under many mid-sized "
        "prompts, at the cost of longer gaps in running streams while a prompt is prefilled.",
    )
    prefix_cache: bool = Field(
        True, description="Reuse the KV cells of earlier requests that share a prompt prefix (cached_tokens)."
    )
    cache_dir: Path = Field(
        default_factory=_default_cache,
        validation_alias=AliasChoices("MICROSERVE_CACHE", "MICROSERVE_CACHE_DIR", "NIM_CACHE_PATH"),
        description="Where model artifacts are placed and verified.",
    )
    # -- models, profiles and the store ------------------------------------------------------------------------
    profile: str | None = Field(
        None,
        validation_alias=_env("profile", "NIM_MODEL_PROFILE"),
        description="Force this profile id; an incompatible one is an error, never a silent fallback.",
    )
    offline: bool = Field(
        False,
        validation_alias=_env("offline", "HF_HUB_OFFLINE"),
        description="Never touch the network; artifacts must already be cached.",
        json_schema_extra={"flag": "--offline/--online"},
    )
    catalog_dir: Path | None = Field(
        None, description="A folder of extra model manifests (*.yaml) added to the built-in catalog."
    )
    lora_dir: Path | None = Field(
        None,
        validation_alias=_env("lora_dir", "NIM_PEFT_SOURCE"),
        description="The adapter directory, one sub-directory per LoRA adapter; `microserve tune` writes into it. "
        "Default: <cache_dir>/loras.",
    )
    lora_refresh_interval: float = Field(
        0.0,
        ge=0.0,
        validation_alias=_env("lora_refresh_interval", "NIM_PEFT_REFRESH_INTERVAL"),
        description="Seconds between rescans of the adapter directory (new adapters served, removed ones retired); "
        "0: only at start.",
    )
    max_loras: int = Field(
        16,
        ge=1,
        le=4096,
        validation_alias=_env("max_loras", "NIM_MAX_CPU_LORAS"),
        description="LoRA adapters kept loaded at once per base model; others load on demand, the least recently "
        "used idle one unloaded first.",
    )
    max_lora_rank: int = Field(
        32,
        ge=1,
        le=4096,
        validation_alias=_env("max_lora_rank", "NIM_MAX_LORA_RANK"),
        description="Largest adapter rank served; a larger adapter is refused.",
    )
    vllm_kv_cache_mb: int | None = Field(
        None,
        ge=16,
        description="KV-cache memory of the vLLM engine in MiB; unset: what vllm_gpu_memory_utilization leaves after "
        "the weights on a GPU, 4 GiB on vLLM's CPU build.",
    )
    vllm_gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="Fraction of the GPU's memory the vLLM engine may take (weights and KV cache)."
    )
    vllm_enforce_eager: bool = Field(
        False,
        description="Run the vLLM engine without torch.compile and CUDA graphs: start-up in seconds instead of "
        "minutes, slower decoding.",
    )

    def resolved_lora_dir(self) -> Path:
        """The adapter directory: ``lora_dir`` when set, else ``<cache_dir>/loras``."""
        return (self.lora_dir or self.cache_dir / "loras").expanduser()

    # -- fine-tuning jobs (/v1/files, /v1/fine_tuning/jobs, /v1/customization/jobs) ----------------------------
    fine_tuning: bool = Field(
        True,
        description="Serve the files and fine-tuning jobs API (OpenAI's /v1/files and /v1/fine_tuning/jobs, NeMo "
        "Customizer's /v1/customization/jobs); jobs train LoRA adapters for the served models.",
    )
    fine_tuning_dir: Path | None = Field(
        None,
        description="Where the fine-tuning state lives: the SQLite database of files and jobs, and the uploaded "
        "files. Default: <cache_dir>/fine_tuning.",
    )
    max_upload_bytes: int = Field(
        512 * 1024 * 1024, ge=1024, description="Largest file POST /v1/files accepts (413 above)."
    )
    fine_tuning_threads: int | None = Field(
        None,
        ge=1,
        description="CPU threads of a fine-tuning job's worker process; default half the usable cores (at least 1), "
        "so that serving keeps the rest.",
    )
    fine_tuning_nice: int = Field(
        10, ge=0, le=19, description="How much a fine-tuning job's worker process lowers its priority (nice)."
    )

    def resolved_fine_tuning_dir(self) -> Path:
        """The fine-tuning state's directory: ``fine_tuning_dir`` when set, else ``<cache_dir>/fine_tuning``."""
        return (self.fine_tuning_dir or self.cache_dir / "fine_tuning").expanduser()

    playground: bool = Field(True, description="Serve the web playground at /playground (and redirect / there).")

    @field_validator("embedding_model", "rerank_model", mode="before")
    @classmethod
    def _none_word(cls, value: object) -> object:
        return None if isinstance(value, str) and value.strip().lower() in ("", "none") else value

    # -- operations: API keys, admission, request limits, drain, logs, tracing, TLS ----------------------------
    # API keys come from the environment or a file only: a command-line flag would show them in `ps`.
    api_keys: SecretStr | None = Field(
        None, description="Comma-separated API keys; when set (or api_key_file is), requests need a Bearer key."
    )
    api_key_file: Path | None = Field(None, description="File with one API key or `sha256:<hex>` digest per line.")
    metrics_public: bool = Field(False, description="Serve the metrics routes without an API key.")
    max_queue: int | None = Field(
        None, ge=0, description="Requests per model waiting for a slot before 429s; default 4 x its slots."
    )
    queue_timeout: float = Field(30.0, gt=0, description="Seconds a request may wait for a slot before a 503.")
    max_body_bytes: int = Field(2 * 1024 * 1024, ge=1024, description="Largest request body accepted (413 above).")
    max_tokens_limit: int | None = Field(
        None, ge=1, description="Most completion tokens one request may ask for (and the default); else the context."
    )
    max_messages: int = Field(1024, ge=1, description="Most messages in one chat request.")
    max_stop_sequences: int = Field(
        4, ge=0, description="Most stop strings in one request (OpenAI's cap of 4 holds too)."
    )
    max_stop_length: int = Field(256, ge=1, description="Longest stop string, in characters.")
    max_n: int = Field(16, ge=1, description="Largest `n` (choices per request).")
    chat_content_special_tokens: bool = Field(
        False,
        description="Let special-token text in chat messages become control tokens, as the template's own markup "
        "does. Only for trusted clients: with it a client can close its turn and open a system turn of its own.",
    )
    header_timeout: float = Field(
        10.0, gt=0, description="Seconds a client has to send a request's headers before the connection is closed."
    )
    keep_alive_timeout: float = Field(
        5.0, gt=0, description="Seconds an idle keep-alive connection stays open between requests."
    )
    max_connections: int = Field(
        1000, ge=1, description="Most open client connections; a connection beyond them is answered 503 and closed."
    )
    drain_timeout: float = Field(
        30.0,
        ge=0,
        description="Seconds in-flight requests may run after SIGTERM/SIGINT; those still running are then cut off "
        "(a stream ends with an error event) and the process exits within 5 s more.",
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
    cors_allow_origins: Annotated[list[str], NoDecode] = Field(
        [],
        description="Origins whose browser scripts may call the API (`*` for any); none by default, which turns "
        "CORS off (comma-separated in env).",
    )
    cors_allow_methods: Annotated[list[str], NoDecode] = Field(
        ["*"], description="Methods allowed cross-origin, with cors_allow_origins (`*` for any)."
    )
    cors_allow_headers: Annotated[list[str], NoDecode] = Field(
        ["*"], description="Request headers allowed cross-origin, with cors_allow_origins (`*` for any)."
    )
    # -- the Responses API's stored responses ------------------------------------------------------------------
    response_store_size: int = Field(
        1024,
        ge=0,
        description="Most responses kept in memory for previous_response_id and GET /v1/responses/{id}; the "
        "oldest go first (0 keeps none).",
    )
    response_store_bytes: int = Field(
        64 * 1024 * 1024, ge=0, description="Most memory the stored responses take, as JSON bytes; the oldest go first."
    )

    def queue_limit(self, slots: int) -> int:
        """Waiting requests allowed for a model with ``slots`` slots."""
        return 4 * slots if self.max_queue is None else self.max_queue

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        if isinstance(value, str):
            value = value.strip().lower()
            return _NIM_LOG_LEVELS.get(value, value)
        return value

    @field_validator("log_format", mode="before")
    @classmethod
    def _jsonl_flag(cls, value: object) -> object:
        # NIM_JSONL_LOGGING is a boolean; MICROSERVE_LOG_FORMAT names the format.
        if isinstance(value, bool):
            return "json" if value else "text"
        if isinstance(value, str):
            lowered = value.strip().lower()
            return "json" if lowered in _TRUE else "text" if lowered in _FALSE else lowered
        return value

    @field_validator(
        "model", "served_model_name", "cors_allow_origins", "cors_allow_methods", "cors_allow_headers", mode="before"
    )
    @classmethod
    def _split(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value
