"""Retrieval routes: OpenAI's ``/v1/embeddings``, NIM's ``/v1/ranking`` and the Cohere/Jina ``/v1/rerank``."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from fastapi import APIRouter, Request

from microserve.protocol.embeddings import EmbeddingRequest, EmbeddingResponse
from microserve.protocol.ranking import (
    Ranking,
    RankingRequest,
    RankingResponse,
    RankingUsage,
    RerankDocument,
    RerankRequest,
    RerankResponse,
    RerankResult,
    RerankUsage,
)
from microserve.server.admission import admit
from microserve.server.json_route import JsonBodyRoute
from microserve.server.routes import ERRORS
from microserve.server.streaming import until_disconnect
from microserve.services.embeddings import EmbeddingService, input_count
from microserve.services.models import ServedModel
from microserve.services.ranking import RankingService, ranker_of

# Retrieval requests are small and many: their bodies are parsed by the lean JsonBodyRoute (server/json_route.py).
router = APIRouter(tags=["retrieval"], responses=ERRORS, route_class=JsonBodyRoute)

T = TypeVar("T")


async def gated(request: Request, model: ServedModel, inputs: int, work: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run ``work`` once the encoder's admission gate lets the request in (429/503 when it is saturated).

    Work of more inputs than one forward pass takes is cancelled if the client leaves; a request that fits in one
    pass is done within that pass, sooner than watching for its client would pay off.
    """
    ticket = await admit(request, model.name)
    try:
        if inputs > model.encoder.stats().max_batch:
            return await until_disconnect(request, work())
        return await work()
    finally:
        ticket.release()


def encoder_metadata(model: ServedModel) -> dict[str, Any]:
    """What ``/v1/models`` tells about an encoder: how it ranks, its shape, and its batching counters."""
    meta: dict[str, Any] = {"ranker": ranker_of(model)}
    if model.engine.ready:
        info = model.encoder.info
        stats = model.encoder.stats()
        if info.kind == "embedding":
            meta["dimensions"] = info.dimensions
        meta.update(
            backend=info.backend,
            max_batch=stats.max_batch,
            forward_passes=stats.forward_passes,
            inputs=stats.inputs,
        )
    return meta


@router.post("/v1/embeddings", response_model=EmbeddingResponse)
async def embeddings(body: EmbeddingRequest, request: Request) -> EmbeddingResponse:
    """Embed a string, a list of strings, or token id lists; float or base64 vectors."""
    service: EmbeddingService = request.app.state.embeddings
    return await gated(request, service.model(body.model), input_count(body.input), lambda: service.embed(body))


@router.post("/v1/ranking", response_model=RankingResponse)
async def ranking(body: RankingRequest, request: Request) -> RankingResponse:
    """NIM reranking: passages sorted best first with their logits."""
    service: RankingService = request.app.state.ranking

    model = service.model(body.model, "/v1/ranking")

    async def run() -> RankingResponse:
        scores = await service.score(model, body.query.text, [p.text for p in body.passages], body.truncate)
        return RankingResponse(
            rankings=[Ranking(index=i, logit=scores.logits[i]) for i in scores.order()],
            usage=RankingUsage(prompt_tokens=scores.tokens, total_tokens=scores.tokens),
        )

    return await gated(request, model, len(body.passages), run)


@router.post("/v1/rerank", response_model=RerankResponse, response_model_exclude_none=True)
@router.post("/v2/rerank", response_model=RerankResponse, response_model_exclude_none=True, include_in_schema=False)
@router.post("/rerank", response_model=RerankResponse, response_model_exclude_none=True, include_in_schema=False)
async def rerank(body: RerankRequest, request: Request) -> RerankResponse:
    """Cohere/Jina reranking: the ``top_n`` best documents with 0..1 relevance scores."""
    service: RankingService = request.app.state.ranking

    model = service.model(body.model, "/v1/rerank")

    async def run() -> RerankResponse:
        texts = [d if isinstance(d, str) else d.text for d in body.documents]
        scores = await service.score(model, body.query, texts, body.truncate)
        order = scores.order()[: body.top_n]
        results = [
            RerankResult(
                index=i,
                relevance_score=scores.relevance(scores.logits[i]),
                document=RerankDocument(text=texts[i]) if body.return_documents else None,
            )
            for i in order
        ]
        return RerankResponse(
            id=f"rerank-{uuid.uuid4().hex}",
            model=model.name,
            results=results,
            usage=RerankUsage(total_tokens=scores.tokens),
        )

    return await gated(request, model, len(body.documents), run)
