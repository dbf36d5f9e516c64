"""The FastAPI application, built from settings: the plan, the engines, the services, the routes and middleware.

:func:`build_app` is the one way an app comes to exist: the CLI, the tests that serve in-process and deployments
that embed microserve (a Ray replica, a gateway) all call it.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, cast

from fastapi import FastAPI
from starlette.types import Scope

from microserve import __version__
from microserve.catalog.plan import ServicePlan, plan_service
from microserve.catalog.resolve import ResolvedModel
from microserve.engines.base import EncoderEngine, EncoderStats, EngineStats, TextEngine
from microserve.engines.registry import build_engine
from microserve.observability.instrumented import InstrumentedEncoder, InstrumentedEngine
from microserve.observability.metrics import Metrics
from microserve.observability.record import current_record
from microserve.observability.tracing import Tracing
from microserve.server.adapters import AdapterManager
from microserve.server.admission import Admission
from microserve.server.auth import HEALTH_PATHS, METRICS_PATHS, ApiKeyMiddleware, load_key_digests
from microserve.server.body_text import BodyTextMiddleware
from microserve.server.cors import CorsMiddleware
from microserve.server.drain import DrainMiddleware, DrainState
from microserve.server.errors import UnhandledErrorMiddleware, install_error_handlers
from microserve.server.fine_tuning import FineTuning
from microserve.server.head import HeadMiddleware
from microserve.server.limits import BodyLimitMiddleware
from microserve.server.logging import RequestLogMiddleware, route_label
from microserve.server.openapi import install_openapi
from microserve.server.routes import adapters as adapter_routes
from microserve.server.routes import anthropic, health, metadata, openai, playground, responses, retrieval, tokenize
from microserve.server.routes import customization as customization_routes
from microserve.server.routes import fine_tuning as fine_tuning_routes
from microserve.server.routes import metrics as metrics_routes
from microserve.services.chat import ChatService
from microserve.services.completions import CompletionService
from microserve.services.embeddings import EmbeddingService
from microserve.services.limits import RequestLimits
from microserve.services.messages import MessagesService
from microserve.services.models import ModelTable, ServedModel
from microserve.services.ranking import RankingService
from microserve.services.responses import ResponsesService, ResponseStore
from microserve.services.tokenize import TokenizeService
from microserve.settings import Settings

log = logging.getLogger(__name__)


def _served(model: ResolvedModel, settings: Settings, metrics: Metrics, tracing: Tracing) -> ServedModel:
    engine = build_engine(model.target(), settings)
    wrapped: TextEngine | EncoderEngine
    if model.task in ("embedding", "ranking"):
        wrapped = InstrumentedEncoder(cast(EncoderEngine, engine), model.name, metrics)
    else:
        wrapped = InstrumentedEngine(cast(TextEngine, engine), model.name, metrics, tracing)
    return ServedModel(
        name=model.name,
        task=model.task,
        engine=wrapped,
        engine_name=model.profile.engine,
        profile=model.profile.id,
        source=model.profile.source.describe(),
        template_family=model.template_family,
        prefixes=model.prefixes,
        aliases=model.aliases if model.task in ("embedding", "ranking") else (),
    )


def build_app(
    settings: Settings,
    *,
    plan: ServicePlan | None = None,
    tracer_provider: Any | None = None,
) -> FastAPI:
    """The whole service for ``settings``: plans the models (unless ``plan`` is given), builds their engines, and
    returns an app whose engines load in the background, so that liveness answers at once.

    Raises ``CatalogError`` when the models cannot be planned and ``KeyFileError`` for an unreadable key file.
    ``tracer_provider`` replaces the OTLP exporter that ``OTEL_EXPORTER_OTLP_ENDPOINT`` would set up.
    """
    plan = plan or plan_service(settings)
    metrics = Metrics()
    tracing = Tracing(tracer_provider) if tracer_provider is not None else Tracing.from_endpoint(settings.otel_endpoint)
    models = ModelTable([_served(m, settings, metrics, tracing) for m in plan.models])
    engines = models.engines()
    admission = {key: _gate(key, model, settings, metrics) for key, model in engines.items()}

    def load() -> list[tuple[str, EngineStats, int]]:
        return [(key, m.text_engine.stats(), admission[key].waiting) for key, m in engines.items() if not m.encodes]

    def encoders() -> list[tuple[str, EncoderStats, int, int]]:
        return [
            (key, m.encoder.stats(), admission[key].running, admission[key].waiting)
            for key, m in engines.items()
            if m.encodes
        ]

    metrics.watch_load(load, encoders, max_loras=settings.max_loras)

    def adapter_view(parent: ServedModel, name: str) -> TextEngine:
        # An adapter shares its base model's engine; its own wrapper labels its metrics with its own name.
        base = parent.engine
        inner = base.inner if isinstance(base, InstrumentedEngine) else parent.text_engine
        return InstrumentedEngine(inner, name, metrics, tracing)

    adapters = AdapterManager(settings, plan, models, adapter_view)
    fine_tuning = _fine_tuning(settings, adapters, lambda: app.state.loaded or app.state.load_error is not None)

    async def load_all(app: FastAPI) -> None:
        try:
            # Engines load side by side: each does its heavy work in its own thread.
            await asyncio.gather(*(model.engine.start() for model in engines.values()))
            # Ready only once the adapters found at start are served too.
            await adapters.refresh()
            app.state.loaded = True
        except Exception as exc:
            log.exception("model failed to load")
            app.state.load_error = f"{type(exc).__name__}: {exc}"
            return
        if settings.lora_refresh_interval > 0 and adapters.enabled:
            await adapters.run(settings.lora_refresh_interval)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loading = asyncio.create_task(load_all(app))
        if fine_tuning is not None:
            fine_tuning.start(asyncio.get_running_loop())
        try:
            yield
        finally:
            loading.cancel()
            if fine_tuning is not None:
                await asyncio.to_thread(fine_tuning.stop)
            for model in engines.values():
                await model.engine.shutdown()
            tracing.shutdown()

    app = FastAPI(
        title="microserve",
        version=__version__,
        description="OpenAI-compatible inference microservice.",
        lifespan=lifespan,
        # Request spans come from microserve's own tracer provider (observability/tracing.py). FastAPI's built-in
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
    app.state.plan = plan
    app.state.models = models
    app.state.load_error = None
    app.state.loaded = False
    app.state.chat = chat = ChatService(models, limits, content_special_tokens=settings.chat_content_special_tokens)
    app.state.responses = ResponsesService(
        chat, ResponseStore(settings.response_store_size, settings.response_store_bytes)
    )
    app.state.messages = MessagesService(chat)
    app.state.tokenizer = TokenizeService(models)
    app.state.completions = CompletionService(models, limits)
    app.state.embeddings = EmbeddingService(models)
    app.state.ranking = RankingService(models)
    app.state.admission = admission
    app.state.adapters = adapters
    app.state.fine_tuning = fine_tuning
    app.state.metrics = metrics
    app.state.tracing = tracing
    app.state.drain = drain
    install_error_handlers(app)

    def smallest_vocabulary() -> int | None:
        texts = [m for m in models if not m.encodes and m.adapter is None]
        if not texts or not all(m.engine.ready for m in texts):
            return None
        return min(m.text_engine.info.vocab_size for m in texts)

    install_openapi(app, limits, smallest_vocabulary)

    def count_response(scope: Scope, status: int) -> None:
        metrics.count_response(scope["method"], route_label(scope), status)

    # Added innermost first: log/id → drain gate → CORS → API key → body limit → body text → HEAD as GET →
    # last-resort 500 → routes.
    app.add_middleware(UnhandledErrorMiddleware)
    app.add_middleware(HeadMiddleware)
    app.add_middleware(BodyTextMiddleware)
    uploads = {fine_tuning_routes.FILES_PATH: settings.max_upload_bytes + fine_tuning_routes.FORM_OVERHEAD}
    app.add_middleware(
        BodyLimitMiddleware, max_bytes=settings.max_body_bytes, streamed=uploads if fine_tuning else None
    )
    app.add_middleware(
        ApiKeyMiddleware,
        digests=load_key_digests(settings),
        metrics_public=settings.metrics_public,
        public_paths=playground.PUBLIC_PATHS if settings.playground else frozenset(),
    )
    if settings.cors_allow_origins:
        # Outside the key check: preflights carry no credentials.
        app.add_middleware(
            CorsMiddleware,
            origins=settings.cors_allow_origins,
            methods=settings.cors_allow_methods,
            headers=settings.cors_allow_headers,
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
    app.include_router(adapter_routes.router)
    app.include_router(responses.router)
    app.include_router(anthropic.router)
    app.include_router(tokenize.router)
    app.include_router(health.router)
    app.include_router(metadata.router)
    app.include_router(metrics_routes.router)
    if fine_tuning is not None:
        for module in (fine_tuning_routes, customization_routes):
            app.include_router(module.json_router)
            app.include_router(module.router)
    if settings.playground:
        app.include_router(playground.router)
    return app


def _fine_tuning(settings: Settings, adapters: AdapterManager, loaded: Callable[[], bool]) -> FineTuning | None:
    # A cache directory that cannot hold the job store turns the fine-tuning routes off, not the service.
    if not settings.fine_tuning:
        return None
    try:
        return FineTuning(settings, adapters, loaded)
    except (OSError, sqlite3.Error) as exc:
        log.warning("the fine-tuning API is off: cannot open %s: %s", settings.resolved_fine_tuning_dir(), exc)
        return None


def _gate(key: str, model: ServedModel, settings: Settings, metrics: Metrics) -> Admission:
    # A text engine admits as many requests as it has sequence slots; an encoder as many as fill one forward pass.
    slots = settings.encoder_max_batch if model.encodes else model.text_engine.stats().slots

    def rejected(reason: str) -> None:
        metrics.rejected.labels(key, reason).inc()

    queue_time = metrics.queue_time.labels(key)

    def admitted(queued: float) -> None:
        queue_time.observe(queued)
        record = current_record()
        if record is not None:
            record.queue_time = queued

    return Admission(
        key, slots, settings.queue_limit(slots), settings.queue_timeout, on_reject=rejected, on_admit=admitted
    )
