"""Wire shapes of the ranking routes: NIM's ``/v1/ranking`` and the Cohere/Jina ``/v1/rerank``."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field

from microserve.protocol.common import Integral, WireModel

MAX_PASSAGES = 1000
# A model named explicitly must be named: "" is not "the default model".
ModelName = Annotated[str, Field(min_length=1)]


class TextItem(WireModel):
    text: str


class QueryItem(WireModel):
    text: str = Field(min_length=1)


class RankingRequest(WireModel):
    """NIM: ``{"model", "query": {"text"}, "passages": [{"text"}], "truncate"}``."""

    model: ModelName | None = None
    query: QueryItem
    passages: list[TextItem] = Field(min_length=1, max_length=MAX_PASSAGES)
    truncate: Literal["NONE", "END"] = "NONE"


class Ranking(BaseModel):
    index: int
    logit: float


class RankingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class RankingResponse(BaseModel):
    """Passages best first."""

    rankings: list[Ranking]
    usage: RankingUsage | None = None


class RerankRequest(WireModel):
    """Cohere/Jina: documents as strings or ``{"text"}`` objects; ``top_n`` keeps the best few."""

    model: ModelName | None = None
    query: str = Field(min_length=1)
    documents: list[str | TextItem] = Field(min_length=1, max_length=MAX_PASSAGES)
    top_n: Annotated[int, Field(ge=1), Integral] | None = None
    return_documents: bool = True
    truncate: Literal["NONE", "END"] = "END"


class RerankDocument(BaseModel):
    text: str


class RerankResult(BaseModel):
    index: int
    relevance_score: float
    document: RerankDocument | None = None


class RerankUsage(BaseModel):
    total_tokens: int


class RerankResponse(BaseModel):
    id: str
    object: Literal["rerank"] = "rerank"
    model: str
    results: list[RerankResult]
    usage: RerankUsage
