"""Wire shapes of ``POST /v1/chat/completions``."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, ValidationInfo, field_validator

from microserve.protocol.common import (
    FinishReason,
    Integral,
    Reply,
    SamplingFields,
    Usage,
    WireModel,
    omitted_if_none,
)


class TextPart(WireModel):
    type: Literal["text"]
    text: str


# Content parts of the media kinds OpenAI, vLLM and Anthropic define: parsed so that a model that takes text only can
# refuse them by name, rather than with a schema error about strings.
MediaKind = Literal[
    "image_url", "input_image", "image", "input_audio", "audio_url", "video_url", "file", "input_file", "document"
]


class MediaPart(WireModel):
    type: MediaKind


class FunctionCall(WireModel):
    name: str
    arguments: str


class ToolCall(WireModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(WireModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart | MediaPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        """The message's text, with list-of-parts content joined by newlines."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content if isinstance(part, TextPart))

    def media(self) -> tuple[int, str] | None:
        """The index and kind of the first non-text content part, if any."""
        if isinstance(self.content, list):
            for i, part in enumerate(self.content):
                if isinstance(part, MediaPart):
                    return i, part.type
        return None


class FunctionDefinition(WireModel):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDefinition(WireModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(WireModel):
    name: str


class NamedToolChoice(WireModel):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(WireModel):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(WireModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None
    # llama-server: ``{"type": "json_object", "schema": {...}}`` constrains to that schema.
    schema_: dict[str, Any] | None = Field(None, alias="schema")


class ChatCompletionRequest(SamplingFields):
    null_means_default = SamplingFields.null_means_default | {"logprobs"}

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Annotated[int, Field(ge=1), Integral] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1), Integral] | None = None
    response_format: ResponseFormat | None = None
    tools: list[ToolDefinition] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20), Integral] | None = None

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and not info.data.get("logprobs"):
            raise ValueError("`top_logprobs` requires `logprobs` to be true")
        return value

    @classmethod
    def schema_extra(cls, schema: dict[str, Any]) -> None:
        """Also state that ``top_logprobs`` needs ``logprobs: true``, which the server checks."""
        super().schema_extra(schema)
        schema["if"] = {"required": ["top_logprobs"], "properties": {"top_logprobs": {"type": "integer"}}}
        schema["then"] = {"required": ["logprobs"], "properties": {"logprobs": {"const": True}}}


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprobEntry(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


# The reply shapes follow OpenAI's published schema field by field: what it requires (nullable or not) is always
# sent, what it makes optional but not nullable is left out when there is nothing to send.


class ChoiceLogprobs(Reply):
    content: list[TokenLogprobEntry] | None
    refusal: list[TokenLogprobEntry] | None = None


class AssistantMessage(Reply):
    role: Literal["assistant"] = "assistant"
    content: str | None
    # This service never refuses on content grounds; the field is required (and nullable) all the same.
    refusal: str | None = None
    tool_calls: list[ToolCall] | None = omitted_if_none()


class ChatChoice(Reply):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None


class ChatCompletion(Reply):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = omitted_if_none()


class FunctionCallDelta(Reply):
    name: str | None = omitted_if_none()
    arguments: str | None = omitted_if_none()


class ToolCallDelta(Reply):
    index: int
    id: str | None = omitted_if_none()
    type: Literal["function"] | None = omitted_if_none()
    function: FunctionCallDelta


class ChatDelta(Reply):
    role: Literal["assistant"] | None = omitted_if_none()
    content: str | None = omitted_if_none()
    tool_calls: list[ToolCallDelta] | None = omitted_if_none()


class ChatChunkChoice(Reply):
    index: int
    delta: ChatDelta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(Reply):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = omitted_if_none()
    system_fingerprint: str | None = omitted_if_none()
