"""Wire shapes of ``POST /v1/completions``."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from microserve.protocol.common import FinishReason, Integral, JsonInt, Reply, SamplingFields, Usage, omitted_if_none

PromptText = Annotated[str, Field(min_length=1)]
DEFAULT_MAX_TOKENS = 16  # OpenAI's

# A prompt: text, texts, token ids, or lists of token ids (one prompt each), as OpenAI's legacy API takes them.
# Token ids are checked against the model's vocabulary once the model is known, each list by its index
# (services/completions.py), so the schema leaves their values and the inner lists' lengths open.
Prompt = (
    PromptText
    | Annotated[list[PromptText], Field(min_length=1)]
    | Annotated[list[JsonInt], Field(min_length=1)]
    | Annotated[list[list[JsonInt]], Field(min_length=1)]
)


class CompletionRequest(SamplingFields):
    # A null prompt means OpenAI's default, the start of a document (see services/completions.py).
    null_means_default = SamplingFields.null_means_default | {"echo", "max_tokens"}

    model: str
    prompt: Prompt | None = None
    # 0 only with ``echo``: the prompt is scored (with ``logprobs``) and nothing is generated.
    max_tokens: Annotated[int, Field(ge=0), Integral] | None = DEFAULT_MAX_TOKENS
    echo: bool = False
    logprobs: Annotated[int, Field(ge=0, le=5), Integral] | None = None
    suffix: str | None = None
    best_of: Annotated[int, Field(ge=1), Integral] | None = None


class CompletionLogprobs(Reply):
    """The legacy logprobs shape: parallel lists, one entry per token (the echoed prompt's first, then the
    generated ones); the prompt's first token has null logprobs, as nothing precedes it."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(Reply):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    # Null in a streamed chunk before the choice's last, as OpenAI streams it.
    finish_reason: FinishReason | None


class Completion(Reply):
    """A ``text_completion``, and each streamed chunk of one (OpenAI streams the same shape)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = omitted_if_none()
    system_fingerprint: str | None = omitted_if_none()
