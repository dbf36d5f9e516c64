"""Wire shapes of vLLM's ``POST /tokenize`` and ``POST /detokenize``."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from microserve.protocol.chat import ChatMessage
from microserve.protocol.common import JsonInt, WireModel


class TokenizeRequest(WireModel):
    """Text (``prompt``) or chat ``messages`` rendered by the model's template; one of the two."""

    # The schema says "exactly one of the two" as the service checks it (a null counts as not given).
    model_config = ConfigDict(
        json_schema_extra={
            "oneOf": [
                {"required": ["prompt"], "properties": {"prompt": {"type": "string"}}},
                {"required": ["messages"], "properties": {"messages": {"type": "array"}}},
            ]
        }
    )

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(WireModel):
    model: str | None = None
    tokens: list[JsonInt]


class DetokenizeResponse(BaseModel):
    prompt: str
