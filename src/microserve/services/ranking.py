"""Ranking passages against a query: a cross-encoder's logits when one is served, else the embedding model's
cosine similarity (a bi-encoder), for NIM's ``/v1/ranking`` and the Cohere/Jina ``/v1/rerank``."""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from typing import Literal

from microserve.engines.base import EncoderInput
from microserve.errors import InvalidRequest, NoModelForRoute
from microserve.protocol.ranking import MAX_PASSAGES
from microserve.services.embeddings import fit
from microserve.services.models import ModelTable, ServedModel


@dataclass(frozen=True, slots=True)
class Scores:
    """One score per passage in request order, how to read them, and the tokens the model read."""

    model: ServedModel
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


def longest_first(first: int, second: int, budget: int) -> tuple[int, int]:
    """How many tokens of each text of a pair to keep so that both fit ``budget``, cutting the longer text first
    as Hugging Face tokenizers' ``longest_first`` truncation does (so scores match sentence-transformers')."""
    if first + second <= budget:
        return first, second
    short = min(first, second)
    long_keep = short if short > budget else max(short, budget - short)
    short_keep = short
    if short_keep + long_keep > budget:
        short_keep = budget // 2
        long_keep = short_keep + budget % 2
    kept = (long_keep, short_keep) if first > second else (short_keep, long_keep)
    return min(first, kept[0]), min(second, kept[1])


def ranker_of(model: ServedModel) -> str:
    """How a model ranks, as ``/v1/models`` reports it."""
    return "cross-encoder" if model.task == "ranking" else "bi-encoder"


class RankingService:
    """Scores passages for ``/v1/ranking`` and ``/v1/rerank``."""

    def __init__(self, models: ModelTable) -> None:
        self._models = models

    def model(self, name: str | None, route: str) -> ServedModel:
        """The named encoder, or (no name) the served cross-encoder, else the embedding model."""
        if name:
            return self._models.encoder(name, route=route)
        candidates = self._models.encoders("ranking") or self._models.encoders("embedding")
        if not candidates:
            raise NoModelForRoute(route)
        return self._models.encoder(candidates[0].name, route=route)

    def _pairs(
        self, model: ServedModel, query: str, passages: list[str], truncate: Literal["NONE", "END"]
    ) -> list[EncoderInput]:
        engine = model.encoder
        info = engine.info
        q = engine.tokenize(query)
        limit = info.context_length
        budget = limit - info.pair_overhead
        out = []
        for i, text in enumerate(passages):
            p = engine.tokenize(text)
            if len(q) + len(p) > budget:
                if truncate == "NONE":
                    what = "the query" if len(q) >= budget else f"passage {i} with the query"
                    raise InvalidRequest(
                        f"{what} has {len(q) + len(p) + info.pair_overhead} tokens with the special tokens, more "
                        f"than the model's limit of {limit} tokens; shorten it or set `truncate` to END",
                        param="query" if len(q) >= budget else "passages",
                        code="context_length_exceeded",
                    )
                keep_q, keep_p = longest_first(len(q), len(p), budget)
                out.append(engine.pair(q[:keep_q], p[:keep_p]))
            else:
                out.append(engine.pair(q, p))
        return out

    def _singles(
        self, model: ServedModel, query: str, passages: list[str], truncate: Literal["NONE", "END"]
    ) -> list[EncoderInput]:
        engine = model.encoder
        info = engine.info
        query_prefix = model.prefixes.get("query", "")
        passage_prefix = model.prefixes.get("passage", "")
        out = [engine.single(fit(engine.tokenize(query_prefix + query), info, truncate, "the query", "query"))]
        for i, text in enumerate(passages):
            ids = engine.tokenize(passage_prefix + text)
            out.append(engine.single(fit(ids, info, truncate, f"passage {i}", "passages")))
        return out

    async def score(
        self, model: ServedModel, query: str, passages: list[str], truncate: Literal["NONE", "END"]
    ) -> Scores:
        """One logit per passage: a cross-encoder's output, or the cosine of unit embeddings."""
        if not query:
            raise InvalidRequest("the query is an empty string", param="query")
        if not passages:
            raise InvalidRequest("there are no passages to rank", param="passages")
        if len(passages) > MAX_PASSAGES:
            raise InvalidRequest(f"{len(passages)} passages; at most {MAX_PASSAGES} are allowed", param="passages")
        engine = model.encoder
        if model.task == "ranking":
            pairs = await asyncio.to_thread(self._pairs, model, query, passages, truncate)
            rows = await engine.encode(pairs)
            return Scores(model, [row[0] for row in rows], sum(len(p.token_ids) for p in pairs))
        singles = await asyncio.to_thread(self._singles, model, query, passages, truncate)
        rows = await engine.encode(singles)
        q = rows[0]
        logits = [sum(a * b for a, b in zip(q, row, strict=True)) for row in rows[1:]]
        return Scores(model, logits, sum(len(s.token_ids) for s in singles))
