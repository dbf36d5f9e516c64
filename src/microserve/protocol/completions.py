"""Wire shapes of ``POST /v1/completions``."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from microserve.protocol.common import FinishReason, SamplingFields, Usage


class CompletionRequest(SamplingFields):
    model: str
    prompt: str | list[str]
    max_tokens: int | None = Field(16, ge=1)
    echo: bool = False


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: FinishReason | None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None
