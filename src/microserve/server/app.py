"""The FastAPI application: routes, error handlers, and the engines' lifecycle."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from microserve import __version__
from microserve.catalog.resolve import ResolvedModel
from microserve.engines.factory import build_text_engine
from microserve.server.errors import install_error_handlers
from microserve.server.logging import RequestLogMiddleware
from microserve.server.routes import health, metadata, openai
from microserve.services.chat import ChatService
from microserve.services.completions import CompletionService
from microserve.services.registry import ModelRegistry, ServedModel
from microserve.settings import Settings

log = logging.getLogger(__name__)


def create_app(settings: Settings, models: list[ResolvedModel]) -> FastAPI:
    """An app serving ``models``; engines load in the background so liveness answers at once."""
    registry = ModelRegistry(
        [
            ServedModel(
                name=m.name,
                engine=build_text_engine(m, settings),
                task=m.task,
                template_family=m.template_family,
                profile=m.profile.id,
                engine_name=m.profile.engine,
                source=m.profile.source.describe(),
            )
            for m in models
        ]
    )

    async def load_all(app: FastAPI) -> None:
        try:
            for model in registry:
                await model.engine.start()
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
    install_error_handlers(app)
    app.add_middleware(RequestLogMiddleware)
    app.include_router(openai.router)
    app.include_router(health.router)
    app.include_router(metadata.router)
    return app
