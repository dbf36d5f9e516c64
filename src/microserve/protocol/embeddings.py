"""Wire shapes of ``POST /v1/embeddings``: OpenAI's fields plus NIM's ``input_type`` and ``truncate``."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field

from microserve.protocol.common import Integral, WireModel

MAX_INPUTS = 2048  # OpenAI's limit on inputs per request
# Token ids are JSON integers (the model is strict), so that `false` is refused rather than read as token 0.
TokenId = Annotated[int, Field(ge=0), Integral]
TokenIds = Annotated[list[TokenId], Field(min_length=1)]
InputText = Annotated[str, Field(min_length=1)]
EmbeddingInput = (
    InputText
    | Annotated[list[InputText], Field(min_length=1, max_length=MAX_INPUTS)]
    | TokenIds
    | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_INPUTS)]
)
Truncate = Literal["NONE", "START", "END"]


class EmbeddingRequest(WireModel):
    model: str
    input: EmbeddingInput
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Field(ge=1), Integral] | None = None
    user: str | None = None
    # NIM extensions: how the text is used (some models want a prefix per use) and what to do when it is too long.
    input_type: Literal["query", "passage"] | None = None
    truncate: Truncate = "NONE"


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage
