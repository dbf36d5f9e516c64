"""Anthropic's Messages API: ``/v1/messages`` (streamed or not) and ``/v1/messages/count_tokens``. Errors on these
routes come in Anthropic's shape (``server/errors.py``) and the key may come as ``x-api-key``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response as HttpResponse
from pydantic import BaseModel

from microserve.observability.tracing import Tracing
from microserve.protocol.anthropic import (
    AnthropicError,
    AnthropicErrorDetail,
    CountTokensRequest,
    MessageResponse,
    MessagesRequest,
    TokenCount,
)
from microserve.server.admission import admit, releasing, shed_if_full
from microserve.server.errors import anthropic_body
from microserve.server.event_stream import event_response
from microserve.server.streaming import until_disconnect
from microserve.services.messages import MessagesService

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": AnthropicError} for code in (400, 401, 404, 413, 429, 500, 503)
}
router = APIRouter(tags=["anthropic"], responses=ERRORS)


def _error_event(status: int, message: str, param: str | None, code: str | None) -> BaseModel:
    body = anthropic_body(status, message)["error"]
    assert isinstance(body, dict)
    return AnthropicError(error=AnthropicErrorDetail(type=body["type"], message=message))


@router.post("/v1/messages", response_model=MessageResponse)
async def create_message(body: MessagesRequest, request: Request) -> MessageResponse | HttpResponse:
    """An assistant message, streamed as Anthropic's events when ``stream`` is true."""
    service: MessagesService = request.app.state.messages
    tracing: Tracing = request.app.state.tracing
    shed_if_full(request, body.model, 1)
    prepared = await service.prepare(body)
    ticket = await admit(request, prepared.chat.model.name, prepared.chat.generation.n)
    if body.stream:
        return event_response(releasing(tracing.stream(service.stream(prepared), "messages"), ticket), _error_event)
    try:
        with tracing.span("messages"):
            return await until_disconnect(request, service.complete(prepared))
    finally:
        ticket.release()


@router.post("/v1/messages/count_tokens", response_model=TokenCount)
async def count_tokens(body: CountTokensRequest, request: Request) -> TokenCount:
    """Tokens of the rendered prompt, tools included."""
    service: MessagesService = request.app.state.messages
    return service.count(body)
