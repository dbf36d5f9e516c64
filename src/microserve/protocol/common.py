"""Wire shapes shared by the OpenAI-style endpoints."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_STOP_SEQUENCES = 4


class WireModel(BaseModel):
    """Base of every request model: unknown fields are ignored, as OpenAI-compatible servers do."""

    model_config = ConfigDict(extra="ignore")


class StreamOptions(WireModel):
    include_usage: bool = False


class StructuredOutputs(WireModel):
    """vLLM's ``structured_outputs`` object: the same constraints as the ``guided_*`` fields."""

    json_: Any = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: Any = None  # not supported: refused by the service


class GuidedFields(WireModel):
    """NIM's ``nvext`` guided decoding, also accepted at the top level as vLLM does, with llama-server's and vLLM's
    other names for the same constraints."""

    guided_json: Any = None  # a schema object or its JSON text; checked by the service
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None
    guided_whitespace_pattern: str | None = None
    # llama-server: a GBNF grammar, and a JSON schema (object or JSON text)
    grammar: str | None = None
    json_schema: Any = None
    structured_outputs: StructuredOutputs | None = None


class NVExt(GuidedFields):
    """NIM's extension object; its sampling extras mirror the top-level extension fields."""

    top_k: int | None = Field(None, ge=-1)
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    ignore_eos: bool | None = None


class SamplingFields(GuidedFields):
    """Sampling fields common to chat and completions, with OpenAI's bounds, plus llama.cpp/vLLM extensions.

    Unknown fields are kept (``model_extra``) so that the service can refuse those of other servers that would
    change the output (``protocol/peer_fields.py``); the others are ignored.
    """

    model_config = ConfigDict(extra="allow")

    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    stop: str | list[str] | None = None
    logit_bias: dict[str, float] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    n: int = Field(1, ge=1, le=128)
    # Extensions that vLLM and llama-server accept under the same names.
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    ignore_eos: bool = False
    nvext: NVExt | None = None

    @field_validator("stop")
    @classmethod
    def _at_most_four_stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > MAX_STOP_SEQUENCES:
            raise ValueError(f"`stop` takes at most {MAX_STOP_SEQUENCES} sequences, got {len(value)}")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _bias_range(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for token, bias in (value or {}).items():
            if not token.strip().lstrip("-").isdigit():
                raise ValueError(f"logit_bias keys must be token ids, got {token!r}")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias values must be between -100 and 100, got {bias} for token {token}")
        return value


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """The error body every failing route returns."""

    error: ErrorDetail


FinishReason = Literal["stop", "length", "tool_calls"]
