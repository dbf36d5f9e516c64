"""OpenAI-compatible routes: models (the list and each one), chat completions, completions."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from microserve.errors import ModelNotFound
from microserve.observability.tracing import Tracing
from microserve.protocol.chat import ChatCompletion, ChatCompletionRequest
from microserve.protocol.completions import Completion, CompletionRequest
from microserve.protocol.models import ModelCard, ModelList
from microserve.server.admission import admit, releasing, shed_if_full
from microserve.server.routes import ERRORS
from microserve.server.routes.retrieval import encoder_metadata
from microserve.server.streaming import sse_response, until_disconnect
from microserve.services.chat import ChatService
from microserve.services.completions import CompletionService
from microserve.services.models import ModelTable, ServedModel

router = APIRouter(tags=["openai"], responses=ERRORS)


def _card(model: ServedModel) -> ModelCard:
    length = model.engine.info.context_length if model.engine.ready else None
    return ModelCard(
        id=model.name,
        created=model.created,
        root=model.source if model.adapter is not None else model.name,
        parent=model.parent,
        max_model_len=length,
        task=model.task,
        profile=model.profile,
        metadata=encoder_metadata(model) if model.encodes else None,
    )


@router.get("/v1/models", response_model=ModelList)
async def list_models(request: Request) -> ModelList:
    """The served models."""
    models: ModelTable = request.app.state.models
    return ModelList(data=[_card(model) for model in models])


@router.get("/v1/models/{model_id:path}", response_model=ModelCard)
async def retrieve_model(model_id: str, request: Request) -> ModelCard:
    """One served model, by any name a client may send as ``model``; 404 for a name not served."""
    models: ModelTable = request.app.state.models
    model = models.find(model_id)
    if model is None:
        raise ModelNotFound(model_id, models.names())
    return _card(model)


@router.post("/v1/chat/completions", response_model=ChatCompletion)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> ChatCompletion | Response:
    """Chat completion, streamed as SSE when ``stream`` is true."""
    service: ChatService = request.app.state.chat
    tracing: Tracing = request.app.state.tracing
    # n choices are n engine sequences sharing one prefill: they hold n slots.
    shed_if_full(request, body.model, body.n)
    prepared = await service.prepare(body)
    ticket = await admit(request, prepared.model.name, prepared.generation.n)
    if body.stream:
        return sse_response(releasing(tracing.stream(service.stream(prepared), "chat.completions"), ticket))
    try:
        with tracing.span("chat.completions"):
            return await until_disconnect(request, service.complete(prepared))
    finally:
        ticket.release()


@router.post("/v1/completions", response_model=Completion)
async def completions(body: CompletionRequest, request: Request) -> Completion | Response:
    """Text completion of one prompt or a list of prompts, streamed as SSE when ``stream`` is true."""
    service: CompletionService = request.app.state.completions
    tracing: Tracing = request.app.state.tracing
    # Each prompt runs n engine sequences: the request holds that many slots.
    shed_if_full(request, body.model, body.n * (max(len(body.prompt), 1) if isinstance(body.prompt, list) else 1))
    prepared = await service.prepare(body)
    ticket = await admit(request, prepared.model.name, sum(g.n for g in prepared.generations))
    if body.stream:
        return sse_response(releasing(tracing.stream(service.stream(prepared), "completions"), ticket))
    try:
        with tracing.span("completions"):
            return await until_disconnect(request, service.complete(prepared))
    finally:
        ticket.release()
