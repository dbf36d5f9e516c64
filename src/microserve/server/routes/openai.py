"""OpenAI-compatible routes: models, chat completions, completions."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from microserve.protocol.chat import ChatCompletion, ChatCompletionRequest
from microserve.protocol.common import ErrorResponse
from microserve.protocol.completions import Completion, CompletionRequest
from microserve.protocol.models import ModelCard, ModelList
from microserve.server.routes.retrieval import encoder_metadata
from microserve.server.streaming import sse_response, until_disconnect
from microserve.services.chat import ChatService
from microserve.services.completions import CompletionService
from microserve.services.registry import EncoderModel, ModelRegistry

ERRORS: dict[int | str, dict] = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 429, 500, 503)}

router = APIRouter(tags=["openai"], responses=ERRORS)


@router.get("/v1/models", response_model=ModelList)
async def list_models(request: Request) -> ModelList:
    """The served models."""
    registry: ModelRegistry = request.app.state.registry
    cards = []
    for model in registry:
        length = model.engine.info.context_length if model.engine.ready else None
        metadata = encoder_metadata(model) if isinstance(model, EncoderModel) else None
        cards.append(
            ModelCard(
                id=model.name,
                created=model.created,
                root=model.name,
                max_model_len=length,
                task=model.task,
                profile=model.profile,
                metadata=metadata,
            )
        )
    return ModelList(data=cards)


@router.post("/v1/chat/completions", response_model=ChatCompletion)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> ChatCompletion | Response:
    """Chat completion, streamed as SSE when ``stream`` is true."""
    service: ChatService = request.app.state.chat
    prepared = await service.prepare(body)
    if body.stream:
        return sse_response(service.stream(prepared))
    return await until_disconnect(request, service.complete(prepared))


@router.post("/v1/completions", response_model=Completion)
async def completions(body: CompletionRequest, request: Request) -> Completion | Response:
    """Text completion of one prompt or a list of prompts, streamed as SSE when ``stream`` is true."""
    service: CompletionService = request.app.state.completions
    prepared = await service.prepare(body)
    if body.stream:
        return sse_response(service.stream(prepared))
    return await until_disconnect(request, service.complete(prepared))
