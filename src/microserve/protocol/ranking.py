"""Wire shapes of the ranking routes: NIM's ``/v1/ranking`` and the Cohere/Jina ``/v1/rerank``."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from microserve.protocol.common import WireModel


class TextItem(WireModel):
    text: str


class RankingRequest(WireModel):
    """NIM: ``{"model", "query": {"text"}, "passages": [{"text"}], "truncate"}``."""

    model: str | None = None
    query: TextItem
    passages: list[TextItem]
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

    model: str | None = None
    query: str
    documents: list[str | TextItem]
    top_n: int | None = Field(None, ge=1)
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
