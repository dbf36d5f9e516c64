"""The FastAPI application: routes, error handlers, middleware, and the engines' lifecycle."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.responses import PlainTextResponse
from starlette.types import Scope

from microserve import __version__
from microserve.catalog.resolve import ResolvedModel
from microserve.engines.base import EncoderStats, EngineStats
from microserve.engines.factory import build_encoder_engine, build_text_engine
from microserve.server.admission import Admission
from microserve.server.auth import HEALTH_PATHS, METRICS_PATHS, ApiKeyMiddleware, load_key_digests
from microserve.server.drain import DrainMiddleware, DrainState
from microserve.server.errors import install_error_handlers
from microserve.server.limits import BodyLimitMiddleware
from microserve.server.logging import RequestLogMiddleware, current_record
from microserve.server.metrics import InstrumentedEncoder, InstrumentedEngine, Metrics, metrics_endpoint, route_label
from microserve.server.routes import health, metadata, openai, playground, retrieval
from microserve.server.tracing import Tracing
from microserve.services.chat import ChatService
from microserve.services.completions import CompletionService
from microserve.services.embeddings import EmbeddingService
from microserve.services.limits import RequestLimits
from microserve.services.ranking import RankingService
from microserve.services.registry import AnyModel, EncoderModel, ModelRegistry, ServedModel
from microserve.settings import Settings

log = logging.getLogger(__name__)


def _served(model: ResolvedModel, settings: Settings, metrics: Metrics, tracing: Tracing) -> AnyModel:
    if model.task in ("embedding", "ranking"):
        return EncoderModel(
            name=model.name,
            engine=InstrumentedEncoder(build_encoder_engine(model, settings), model.name, metrics),
            task=model.task,
            prefixes=model.prefixes,
            aliases=model.aliases,
            profile=model.profile.id,
            engine_name=model.profile.engine,
            source=model.profile.source.describe(),
        )
    return ServedModel(
        name=model.name,
        engine=InstrumentedEngine(build_text_engine(model, settings), model.name, metrics, tracing),
        task=model.task,
        template_family=model.template_family,
        profile=model.profile.id,
        engine_name=model.profile.engine,
        source=model.profile.source.describe(),
    )


def create_app(settings: Settings, models: list[ResolvedModel], *, tracer_provider: Any | None = None) -> FastAPI:
    """An app serving ``models``; engines load in the background so liveness answers at once.

    ``tracer_provider`` replaces the OTLP exporter that ``OTEL_EXPORTER_OTLP_ENDPOINT`` would set up.
    """
    metrics = Metrics()
    tracing = Tracing(tracer_provider) if tracer_provider is not None else Tracing.from_endpoint(settings.otel_endpoint)
    registry = ModelRegistry([_served(m, settings, metrics, tracing) for m in models])
    admission = {model.name: _gate(model, settings, metrics) for model in registry}

    def load() -> list[tuple[str, EngineStats, int]]:
        return [(m.name, m.engine.stats(), admission[m.name].waiting) for m in registry if isinstance(m, ServedModel)]

    def encoders() -> list[tuple[str, EncoderStats, int, int]]:
        return [
            (m.name, m.engine.stats(), admission[m.name].running, admission[m.name].waiting)
            for m in registry
            if isinstance(m, EncoderModel)
        ]

    metrics.watch_load(load, encoders)

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
            tracing.shutdown()

    app = FastAPI(
        title="microserve",
        version=__version__,
        description="OpenAI-compatible inference microservice.",
        lifespan=lifespan,
        # Request spans come from microserve's own tracer provider (server/tracing.py). FastAPI's built-in
        # telemetry would add a second server span whenever a process-global provider exists, and costs a few
        # environment lookups on every request even when none does.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    limits = RequestLimits(
        max_tokens=settings.max_tokens_limit,
        max_messages=settings.max_messages,
        max_stop_sequences=settings.max_stop_sequences,
        max_stop_length=settings.max_stop_length,
        max_n=settings.max_n,
    )
    drain = DrainState()
    app.state.settings = settings
    app.state.registry = registry
    app.state.load_error = None
    app.state.chat = ChatService(registry, limits)
    app.state.completions = CompletionService(registry, limits)
    app.state.embeddings = EmbeddingService(registry)
    app.state.ranking = RankingService(registry)
    app.state.admission = admission
    app.state.metrics = metrics
    app.state.tracing = tracing
    app.state.drain = drain
    install_error_handlers(app)

    def count_response(scope: Scope, status: int) -> None:
        metrics.count_response(scope["method"], route_label(scope), status)

    # Added innermost first: log/id → drain gate → API key → body limit → routes.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(
        ApiKeyMiddleware,
        digests=load_key_digests(settings),
        metrics_public=settings.metrics_public,
        public_paths=playground.PUBLIC_PATHS if settings.playground else frozenset(),
    )
    app.add_middleware(DrainMiddleware, state=drain)
    app.add_middleware(
        RequestLogMiddleware,
        on_response=count_response,
        tracing=tracing,
        log_prompts=settings.log_prompts,
        quiet_paths=HEALTH_PATHS | METRICS_PATHS | {"/v1/health/live", "/v1/health/ready"},
    )
    # Routes are matched in order: retrieval first, since its requests are the cheapest to serve and come at the
    # highest rates, so the matching is the largest share of their cost.
    app.include_router(retrieval.router)
    app.include_router(openai.router)
    app.include_router(health.router)
    app.include_router(metadata.router)
    if settings.playground:
        app.include_router(playground.router)
    for path in sorted(METRICS_PATHS):
        app.add_api_route(
            path,
            metrics_endpoint,
            methods=["GET"],
            tags=["health"],
            response_class=PlainTextResponse,
            summary="Prometheus metrics",
            responses={200: {"content": {"text/plain": {}}}, 401: {"model": openai.ErrorResponse}},
        )
    return app


def _gate(model: AnyModel, settings: Settings, metrics: Metrics) -> Admission:
    name = model.name
    # A text model admits as many requests as it has sequence slots; an encoder as many as fill one forward pass.
    slots = model.engine.stats().slots if isinstance(model, ServedModel) else settings.encoder_max_batch

    def rejected(reason: str) -> None:
        metrics.rejected.labels(name, reason).inc()

    queue_time = metrics.queue_time.labels(name)

    def admitted(queued: float) -> None:
        queue_time.observe(queued)
        record = current_record()
        if record is not None:
            record.queue_time = queued

    return Admission(
        name, slots, settings.queue_limit(slots), settings.queue_timeout, on_reject=rejected, on_admit=admitted
    )
