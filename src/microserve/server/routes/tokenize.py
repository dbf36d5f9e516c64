"""vLLM's ``/tokenize`` and ``/detokenize``."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request

from microserve.protocol.tokenize import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse
from microserve.server.routes import ERRORS
from microserve.services.tokenize import TokenizeService

router = APIRouter(tags=["tokenizer"], responses=ERRORS)


@router.post("/tokenize", response_model=TokenizeResponse, response_model_exclude_none=False)
async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
    """Token ids of a prompt or of chat messages rendered by the model's template."""
    service: TokenizeService = request.app.state.tokenizer
    # A prompt may be megabytes: tokenized off the event loop.
    return await asyncio.to_thread(service.tokenize, body)


@router.post("/detokenize", response_model=DetokenizeResponse)
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    """The text of token ids."""
    service: TokenizeService = request.app.state.tokenizer
    return service.detokenize(body)
