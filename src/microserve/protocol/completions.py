"""Wire shapes of ``POST /v1/completions``."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from microserve.protocol.common import FinishReason, SamplingFields, Usage

# A prompt: text, texts, token ids, or lists of token ids (one prompt each), as OpenAI's legacy API takes them.
Prompt = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(SamplingFields):
    model: str
    prompt: Prompt
    # 0 only with ``echo``: the prompt is scored (with ``logprobs``) and nothing is generated.
    max_tokens: int | None = Field(16, ge=0)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=5)
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)


class CompletionLogprobs(BaseModel):
    """The legacy logprobs shape: parallel lists, one entry per token (the echoed prompt's first, then the
    generated ones); the prompt's first token has null logprobs, as nothing precedes it."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None
