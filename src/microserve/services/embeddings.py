"""Embeddings: inputs → token sequences (prefix, truncation) → encoder → OpenAI ``list`` of ``embedding``."""

from __future__ import annotations

import asyncio
import base64
import math
from collections.abc import Sequence
from typing import Literal

from microserve.engines.base import EncoderInfo, EncoderInput
from microserve.errors import InvalidRequest
from microserve.protocol.embeddings import (
    MAX_INPUTS,
    Embedding,
    EmbeddingRequest,
    EmbeddingResponse,
    EmbeddingUsage,
)
from microserve.services.models import ModelTable, ServedModel

# Below this many characters tokenizing takes microseconds, less than a hop to a worker thread and back.
INLINE_TOKENIZE_CHARS = 4096
TruncateSide = Literal["NONE", "START", "END"]


def fit(ids: list[int], info: EncoderInfo, truncate: TruncateSide, what: str, param: str) -> list[int]:
    """``ids`` cut so that, with the model's special tokens around them, they fit its limit as ``truncate`` says.

    ``NONE`` refuses an over-long input with a 400 naming the limit, as NIM does; ``END``/``START`` drop tokens from
    that side. Token lists that already carry the special tokens lose them here (the engine adds them again).
    """
    before, after = info.single_prefix, info.single_suffix
    if (
        (before or after)
        and len(ids) >= len(before) + len(after)
        and tuple(ids[: len(before)]) == before
        and tuple(ids[len(ids) - len(after) :]) == after
    ):
        ids = ids[len(before) : len(ids) - len(after)]
    room = info.context_length - info.single_overhead
    if len(ids) > room:
        if truncate == "NONE":
            raise InvalidRequest(
                f"{what} has {len(ids) + info.single_overhead} tokens, more than the model's limit of "
                f"{info.context_length} tokens; shorten it or set `truncate` to END or START",
                param=param,
                code="context_length_exceeded",
            )
        ids = ids[:room] if truncate == "END" else ids[len(ids) - room :]
    return ids


def shorten(vector: Sequence[float], dimensions: int | None) -> list[float]:
    """The first ``dimensions`` components, renormalised to unit length (Matryoshka-style, as OpenAI's
    ``dimensions`` does)."""
    if dimensions is None or dimensions >= len(vector):
        return list(vector)
    head = list(vector[:dimensions])
    norm = math.sqrt(sum(x * x for x in head))
    return [x / norm for x in head] if norm > 0 else head


def encode_base64(vector: list[float]) -> str:
    """Little-endian float32 bytes in base64, as OpenAI returns for ``encoding_format="base64"``."""
    import numpy as np

    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")


def input_items(raw: object) -> list[str | list[int]]:
    """The inputs ``input`` holds: a string or a single token list is one, else each item of the list."""
    if isinstance(raw, str):
        return [raw]
    if isinstance(raw, list) and raw and all(isinstance(x, int) for x in raw):
        return [list(raw)]
    return list(raw) if isinstance(raw, list) else []


def input_count(raw: object) -> int:
    """How many inputs ``input`` holds."""
    return len(input_items(raw))


def _size(raw: object) -> int:
    if isinstance(raw, str):
        return len(raw)
    if isinstance(raw, list):
        return sum(len(x) if isinstance(x, str | list) else 1 for x in raw)
    return 0


class EmbeddingService:
    """Serves ``/v1/embeddings`` for every embedding model in the registry."""

    def __init__(self, models: ModelTable) -> None:
        self._models = models

    def model(self, name: str) -> ServedModel:
        """The embedding model called ``name``; a cross-encoder or a text model is a 400."""
        model = self._models.encoder(name, route="/v1/embeddings")
        if model.task != "embedding":
            raise InvalidRequest(
                f"`{model.name}` is a cross-encoder; it scores pairs on /v1/ranking and cannot embed",
                param="model",
                code="model_not_supported",
            )
        return model

    def sequences(self, model: ServedModel, request: EmbeddingRequest) -> list[EncoderInput]:
        """Validated token sequences, one per input (tokenizing is CPU work: call this in a thread)."""
        items = input_items(request.input)
        if not items:
            raise InvalidRequest("`input` must not be empty", param="input")
        if len(items) > MAX_INPUTS:
            raise InvalidRequest(f"`input` has {len(items)} items; at most {MAX_INPUTS} are allowed", param="input")
        engine = model.encoder
        info = engine.info
        prefix = model.prefixes.get(request.input_type, "") if request.input_type else ""
        out = []
        for i, item in enumerate(items):
            what = "the input" if len(items) == 1 else f"input {i}"
            if isinstance(item, str):
                if not item:
                    raise InvalidRequest(f"{what} is an empty string", param="input")
                ids = engine.tokenize(prefix + item)
            else:
                if not item:
                    raise InvalidRequest(f"{what} is an empty token list", param="input")
                bad = next((t for t in item if not 0 <= t < info.vocab_size), None)
                if bad is not None:
                    raise InvalidRequest(
                        f"{what} holds token id {bad}, outside the vocabulary [0, {info.vocab_size})", param="input"
                    )
                ids = list(item)
            out.append(engine.single(fit(ids, info, request.truncate, what, "input")))
        return out

    async def embed(self, request: EmbeddingRequest) -> EmbeddingResponse:
        """Embed every input; vectors are unit length, cut to ``dimensions`` when asked."""
        model = self.model(request.model)
        info = model.encoder.info
        if request.dimensions is not None and request.dimensions > info.dimensions:
            raise InvalidRequest(
                f"`dimensions` is {request.dimensions}, but `{model.name}` has {info.dimensions}",
                param="dimensions",
            )
        if _size(request.input) <= INLINE_TOKENIZE_CHARS:
            sequences = self.sequences(model, request)
        else:
            sequences = await asyncio.to_thread(self.sequences, model, request)
        rows = await model.encoder.encode(sequences)
        # Built without validation: the values are the encoder's own, and checking each float of every vector
        # again costs more per request than anything else in this method.
        data = []
        for i, row in enumerate(rows):
            vector = shorten(row, request.dimensions)
            value: list[float] | str = encode_base64(vector) if request.encoding_format == "base64" else vector
            data.append(Embedding.model_construct(index=i, embedding=value))
        tokens = sum(len(s.token_ids) for s in sequences)
        return EmbeddingResponse.model_construct(
            data=data, model=model.name, usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens)
        )
