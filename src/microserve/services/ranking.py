"""Ranking passages against a query: a cross-encoder's logits when one is served, else the embedding model's
cosine similarity (a bi-encoder), for NIM's ``/v1/ranking`` and the Cohere/Jina ``/v1/rerank``."""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from typing import Literal

from microserve.engines.base import EncoderInput
from microserve.errors import InvalidRequest
from microserve.services.embeddings import fit
from microserve.services.registry import EncoderModel, ModelRegistry

MAX_PASSAGES = 1000


@dataclass(frozen=True, slots=True)
class Scores:
    """One score per passage in request order, how to read them, and the tokens the model read."""

    model: EncoderModel
    logits: list[float]
    tokens: int

    @property
    def cross_encoder(self) -> bool:
        return self.model.task == "ranking"

    def relevance(self, logit: float) -> float:
        """A 0..1 relevance score: the sigmoid of a cross-encoder's logit (as sentence-transformers' CrossEncoder
        reports it); a bi-encoder's cosine similarity is already bounded and is returned as it is."""
        return 1.0 / (1.0 + math.exp(-logit)) if self.cross_encoder else logit

    def order(self) -> list[int]:
        """Passage indices best first (ties keep request order)."""
        return sorted(range(len(self.logits)), key=lambda i: -self.logits[i])


def ranker_of(model: EncoderModel) -> str:
    """How a model ranks, as ``/v1/models`` reports it."""
    return "cross-encoder" if model.task == "ranking" else "bi-encoder"


class RankingService:
    """Scores passages for ``/v1/ranking`` and ``/v1/rerank``."""

    def __init__(self, registry: ModelRegistry) -> None:
        self._registry = registry

    def model(self, name: str | None, route: str) -> EncoderModel:
        """The named encoder, or (no name) the served cross-encoder, else the embedding model."""
        if name:
            return self._registry.get_encoder(name, route=route)
        candidates = self._registry.encoders("ranking") or self._registry.encoders("embedding")
        if not candidates:
            raise InvalidRequest(f"this service serves no model for {route}", param="model")
        return self._registry.get_encoder(candidates[0].name, route=route)

    def _pairs(
        self, model: EncoderModel, query: str, passages: list[str], truncate: Literal["NONE", "END"]
    ) -> list[EncoderInput]:
        engine = model.engine
        info = engine.info
        q = engine.tokenize(query)
        limit = info.context_length
        if len(q) + 3 > limit:
            if truncate == "NONE":
                raise InvalidRequest(
                    f"the query has {len(q) + 3} tokens with its special tokens, more than the model's limit of "
                    f"{limit} tokens; shorten it or set `truncate` to END",
                    param="query",
                    code="context_length_exceeded",
                )
            q = q[: (limit - 3) // 2]
        out = []
        for i, text in enumerate(passages):
            p = engine.tokenize(text)
            room = limit - 3 - len(q)
            if len(p) > room:
                if truncate == "NONE":
                    raise InvalidRequest(
                        f"passage {i} with the query has {len(q) + len(p) + 3} tokens, more than the model's limit "
                        f"of {limit} tokens; shorten it or set `truncate` to END",
                        param="passages",
                        code="context_length_exceeded",
                    )
                p = p[:room]
            first = [info.cls_id, *q, info.sep_id]
            second = [*p, info.sep_id]
            out.append(EncoderInput(first + second, [0] * len(first) + [1] * len(second)))
        return out

    def _singles(
        self, model: EncoderModel, query: str, passages: list[str], truncate: Literal["NONE", "END"]
    ) -> list[EncoderInput]:
        engine = model.engine
        info = engine.info
        query_prefix = model.prefixes.get("query", "")
        passage_prefix = model.prefixes.get("passage", "")
        out = [EncoderInput(fit(engine.tokenize(query_prefix + query), info, truncate, "the query", "query"))]
        for i, text in enumerate(passages):
            ids = engine.tokenize(passage_prefix + text)
            out.append(EncoderInput(fit(ids, info, truncate, f"passage {i}", "passages")))
        return out

    async def score(
        self, model: EncoderModel, query: str, passages: list[str], truncate: Literal["NONE", "END"]
    ) -> Scores:
        """One logit per passage: a cross-encoder's output, or the cosine of unit embeddings."""
        if not query:
            raise InvalidRequest("the query is an empty string", param="query")
        if not passages:
            raise InvalidRequest("there are no passages to rank", param="passages")
        if len(passages) > MAX_PASSAGES:
            raise InvalidRequest(f"{len(passages)} passages; at most {MAX_PASSAGES} are allowed", param="passages")
        if model.task == "ranking":
            pairs = await asyncio.to_thread(self._pairs, model, query, passages, truncate)
            rows = await model.engine.encode(pairs)
            return Scores(model, [row[0] for row in rows], sum(len(p.token_ids) for p in pairs))
        singles = await asyncio.to_thread(self._singles, model, query, passages, truncate)
        rows = await model.engine.encode(singles)
        q = rows[0]
        logits = [sum(a * b for a, b in zip(q, row, strict=True)) for row in rows[1:]]
        return Scores(model, logits, sum(len(s.token_ids) for s in singles))
