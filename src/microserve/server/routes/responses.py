"""OpenAI's Responses API: create (streamed or not), retrieve, list input items, delete."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response as HttpResponse
from pydantic import BaseModel

from microserve.observability.tracing import Tracing
from microserve.protocol.responses import DeletedResponse, ErrorEvent, InputItemList, Response, ResponseRequest
from microserve.server.admission import admit, releasing, shed_if_full
from microserve.server.event_stream import event_response
from microserve.server.routes import ERRORS
from microserve.server.streaming import until_disconnect
from microserve.services.responses import ResponseNotFound, ResponsesService

router = APIRouter(tags=["openai"], responses=ERRORS)


def _error_event(status: int, message: str, param: str | None, code: str | None) -> BaseModel:
    return ErrorEvent(code=code or str(status), message=message, param=param)


@router.post("/v1/responses", response_model=Response)
async def create_response(body: ResponseRequest, request: Request) -> Response | HttpResponse:
    """A model response to text or items, streamed as semantic events when ``stream`` is true."""
    service: ResponsesService = request.app.state.responses
    tracing: Tracing = request.app.state.tracing
    shed_if_full(request, body.model, 1)
    prepared = await service.prepare(body)
    ticket = await admit(request, prepared.chat.model.name, prepared.chat.generation.n)
    if body.stream:
        events = releasing(tracing.stream(service.stream(prepared), "responses"), ticket)
        return event_response(events, _error_event)
    try:
        with tracing.span("responses"):
            return await until_disconnect(request, service.complete(prepared))
    finally:
        ticket.release()


@router.get("/v1/responses/{response_id}", response_model=Response)
async def get_response(response_id: str, request: Request) -> Response:
    """A stored response."""
    service: ResponsesService = request.app.state.responses
    stored = service.store.get(response_id)
    if stored is None:
        raise ResponseNotFound(response_id)
    return stored.response


@router.get("/v1/responses/{response_id}/input_items", response_model=InputItemList)
async def list_input_items(response_id: str, request: Request) -> InputItemList:
    """The input items of a stored response, in order."""
    service: ResponsesService = request.app.state.responses
    stored = service.store.get(response_id)
    if stored is None:
        raise ResponseNotFound(response_id)
    data = [{"id": f"{response_id}_item_{i}", **item} for i, item in enumerate(stored.input_items)]
    return InputItemList(data=data, first_id=data[0]["id"] if data else None, last_id=data[-1]["id"] if data else None)


@router.delete("/v1/responses/{response_id}", response_model=DeletedResponse)
async def delete_response(response_id: str, request: Request) -> DeletedResponse:
    """Forget a stored response."""
    service: ResponsesService = request.app.state.responses
    if not service.store.delete(response_id):
        raise ResponseNotFound(response_id)
    return DeletedResponse(id=response_id)
