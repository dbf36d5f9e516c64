"""OpenTelemetry: a request makes an HTTP span with the service span under it and the engine span under that."""

from __future__ import annotations

import time

from fastapi.testclient import TestClient
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from microserve.server.app import build_app
from microserve.settings import Settings


def test_spans_nest_http_service_engine() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    settings = Settings(parallel=1, context_length=512, embedding_model="none")
    app = build_app(settings, tracer_provider=provider)
    model = app.state.plan.models[0]
    with TestClient(app) as client:
        deadline = time.monotonic() + 120
        while client.get("/v1/health/ready").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        exporter.clear()
        for stream in (False, True):
            response = client.post(
                "/v1/chat/completions",
                json={
                    "model": model.name,
                    "messages": [{"role": "user", "content": "Hi"}],
                    "max_tokens": 3,
                    "stream": stream,
                },
                headers={"X-Request-Id": f"trace-{stream}"},
            )
            assert response.status_code == 200
    spans = exporter.get_finished_spans()
    for stream in (False, True):
        http = next(s for s in spans if s.attributes and s.attributes.get("request.id") == f"trace-{stream}")
        assert http.name == "POST /v1/chat/completions"
        assert http.attributes["http.response.status_code"] == 200
        service = next(s for s in spans if s.parent is not None and s.parent.span_id == http.context.span_id)
        assert service.name == "chat.completions"
        engine = next(s for s in spans if s.parent is not None and s.parent.span_id == service.context.span_id)
        assert engine.name == "engine.generate"
        assert engine.attributes["gen_ai.usage.output_tokens"] == 3
        assert engine.context.trace_id == http.context.trace_id
