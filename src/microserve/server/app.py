"""The FastAPI application: routes, error handlers, and the engines' lifecycle."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from microserve import __version__
from microserve.catalog.resolve import ResolvedModel
from microserve.engines.factory import build_encoder_engine, build_text_engine
from microserve.server.errors import install_error_handlers
from microserve.server.logging import RequestLogMiddleware
from microserve.server.routes import health, metadata, openai, retrieval
from microserve.services.chat import ChatService
from microserve.services.completions import CompletionService
from microserve.services.embeddings import EmbeddingService
from microserve.services.ranking import RankingService
from microserve.services.registry import AnyModel, EncoderModel, ModelRegistry, ServedModel
from microserve.settings import Settings

log = logging.getLogger(__name__)


def _served(model: ResolvedModel, settings: Settings) -> AnyModel:
    if model.task in ("embedding", "ranking"):
        return EncoderModel(
            name=model.name,
            engine=build_encoder_engine(model, settings),
            task=model.task,
            prefixes=model.prefixes,
            aliases=model.aliases,
            profile=model.profile.id,
            engine_name=model.profile.engine,
            source=model.profile.source.describe(),
        )
    return ServedModel(
        name=model.name,
        engine=build_text_engine(model, settings),
        task=model.task,
        template_family=model.template_family,
        profile=model.profile.id,
        engine_name=model.profile.engine,
        source=model.profile.source.describe(),
    )


def create_app(settings: Settings, models: list[ResolvedModel]) -> FastAPI:
    """An app serving ``models``; engines load in the background so liveness answers at once."""
    registry = ModelRegistry([_served(m, settings) for m in models])

    async def load_all(app: FastAPI) -> None:
        try:
            # Engines load side by side: each does its heavy work in its own thread.
            await asyncio.gather(*(model.engine.start() for model in registry))
        except Exception as exc:
            log.exception("model failed to load")
            app.state.load_error = f"{type(exc).__name__}: {exc}"

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loading = asyncio.create_task(load_all(app))
        try:
            yield
        finally:
            loading.cancel()
            for model in registry:
                await model.engine.shutdown()

    app = FastAPI(
        title="microserve",
        version=__version__,
        description="OpenAI-compatible inference microservice.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.registry = registry
    app.state.load_error = None
    app.state.chat = ChatService(registry)
    app.state.completions = CompletionService(registry)
    app.state.embeddings = EmbeddingService(registry)
    app.state.ranking = RankingService(registry)
    install_error_handlers(app)
    app.add_middleware(RequestLogMiddleware)
    app.include_router(openai.router)
    app.include_router(retrieval.router)
    app.include_router(health.router)
    app.include_router(metadata.router)
    return app
