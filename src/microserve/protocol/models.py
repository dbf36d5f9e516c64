"""Wire shapes of ``GET /v1/models``."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "microserve"
    root: str | None = None
    # An adapter: the base model it runs on (``root`` is then the adapter's path), as vLLM lists them.
    parent: str | None = None
    max_model_len: int | None = None
    task: str | None = None
    profile: str | None = None
    # Encoders: how the model ranks ("bi-encoder" or "cross-encoder"), its dimensions and batching counters.
    metadata: dict[str, Any] | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
