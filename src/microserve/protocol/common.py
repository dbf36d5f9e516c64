"""Wire shapes shared by the OpenAI-style endpoints."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints, model_validator

MAX_STOP_SEQUENCES = 4
# A logit_bias key: a token id in ASCII decimal digits (int() would also take "²" or "--5" past str.isdigit()).
TOKEN_ID_KEY = r"^[0-9]{1,10}$"


def _integral(value: Any) -> Any:
    # JSON Schema's integer is any number with a zero fraction (5.0 included); strings and booleans are not.
    return int(value) if isinstance(value, float) and value.is_integer() else value


# Marks an integer field of a request (after its Field constraints, so that they stay in the JSON schema): it
# takes a JSON integer or a number with a zero fraction, never "5" or true (the models are strict).
Integral = BeforeValidator(_integral)
JsonInt = Annotated[int, Integral]


def _is_none(value: object) -> bool:
    return value is None


def omitted_if_none(default: Any = None, **kwargs: Any) -> Any:
    """A reply field left out of the JSON when it is None, where OpenAI's schema has it optional but not nullable
    (``tool_calls``, ``system_fingerprint``): a typed client rejects an explicit null there."""
    return Field(default, exclude_if=_is_none, **kwargs)


class WireModel(BaseModel):
    """Base of every request model: unknown fields are ignored, as OpenAI-compatible servers do. Values are taken
    strictly, as JSON types, as their JSON schema says (and OpenAI does): ``"5"`` or ``true`` is not an integer."""

    model_config = ConfigDict(extra="ignore", strict=True)


class Reply(BaseModel):
    """Base of the OpenAI reply shapes that are serialised as they are, never with ``exclude_none``: each field
    says itself whether a None is sent as null (required and nullable in OpenAI's schema, as ``finish_reason`` in
    every chunk and ``message.refusal``) or left out (:func:`omitted_if_none`)."""


def _nullable(schema: dict[str, Any]) -> None:
    """Let a property's JSON schema also take null (in place)."""
    if schema.get("type") == "null" or any(option.get("type") == "null" for option in schema.get("anyOf", [])):
        return
    kept: dict[str, Any] = {k: schema.pop(k) for k in ("title", "description", "default", "deprecated") if k in schema}
    inner = dict(schema)
    schema.clear()
    if "anyOf" in inner and len(inner) == 1:
        schema["anyOf"] = [*inner["anyOf"], {"type": "null"}]
    else:
        schema["anyOf"] = [inner, {"type": "null"}]
    schema.update(kept)


class NullMeansDefault(WireModel):
    """A request whose listed fields take an explicit null as "the default", where OpenAI's spec makes them
    nullable (``"stream": null``, ``"n": null``): the null is dropped before validation, and the schema says null
    is allowed."""

    null_means_default: ClassVar[frozenset[str]] = frozenset()
    model_config = ConfigDict(
        extra="ignore", strict=True, json_schema_extra=lambda schema, cls: cls.schema_extra(schema)
    )

    @classmethod
    def schema_extra(cls, schema: dict[str, Any]) -> None:
        """Adjust the generated JSON schema (subclasses add cross-field rules)."""
        properties = schema.get("properties", {})
        for name in cls.null_means_default:
            if name in properties:
                _nullable(properties[name])

    @model_validator(mode="before")
    @classmethod
    def _drop_nulls(cls, data: Any) -> Any:
        if isinstance(data, dict) and any(data.get(name, 0) is None for name in cls.null_means_default):
            return {k: v for k, v in data.items() if not (v is None and k in cls.null_means_default)}
        return data


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
    guided_choice: list[str] | None = Field(None, min_length=1)
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None
    guided_whitespace_pattern: str | None = None
    # llama-server: a GBNF grammar, and a JSON schema (object or JSON text)
    grammar: str | None = None
    json_schema: Any = None
    structured_outputs: StructuredOutputs | None = None


class NVExt(GuidedFields):
    """NIM's extension object; its sampling extras mirror the top-level extension fields."""

    top_k: Annotated[int, Field(ge=-1), Integral] | None = None
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    ignore_eos: bool | None = None


class SamplingFields(NullMeansDefault, GuidedFields):
    """Sampling fields common to chat and completions, with OpenAI's bounds, plus llama.cpp/vLLM extensions.

    Every bound the server enforces before it looks the model up is in the schema; the operator's limits (``n``,
    stop strings, messages, ``max_tokens``) are written into the served ``/openapi.json`` (server/openapi.py).
    Unknown fields are kept (``model_extra``) so that the service can refuse those of other servers that would
    change the output (``protocol/peer_fields.py``); the others are ignored.
    """

    model_config = ConfigDict(extra="allow")
    null_means_default = frozenset({"stream", "n"})

    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    seed: JsonInt | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP_SEQUENCES)] | None = None
    logit_bias: (
        dict[Annotated[str, StringConstraints(pattern=TOKEN_ID_KEY)], Annotated[float, Field(ge=-100.0, le=100.0)]]
        | None
    ) = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    n: Annotated[int, Field(ge=1, le=128), Integral] = 1
    # Extensions that vLLM and llama-server accept under the same names.
    top_k: Annotated[int, Field(ge=-1), Integral] | None = None
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    ignore_eos: bool = False
    nvext: NVExt | None = None

    @classmethod
    def schema_extra(cls, schema: dict[str, Any]) -> None:
        """Also say that a logit_bias key that is not a token id is refused (pydantic lists only the keys it takes)."""
        super().schema_extra(schema)
        for option in schema.get("properties", {}).get("logit_bias", {}).get("anyOf", []):
            if option.get("type") == "object":
                option["additionalProperties"] = False


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = omitted_if_none()


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """The error body every failing route returns."""

    error: ErrorDetail


FinishReason = Literal["stop", "length", "tool_calls"]
