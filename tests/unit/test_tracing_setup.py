"""Tracing is on exactly when an OTLP endpoint is configured."""

from __future__ import annotations

import pytest

from microserve.observability.tracing import Tracing
from microserve.settings import Settings


def test_off_without_an_endpoint() -> None:
    tracing = Tracing.from_endpoint(Settings().otel_endpoint)
    assert not tracing.enabled
    with tracing.span("x") as span:
        span.set_attribute("k", 1)  # a no-op span accepts attributes


def test_on_with_the_standard_otel_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    settings = Settings()
    assert settings.otel_endpoint == "http://127.0.0.1:9"
    tracing = Tracing.from_endpoint(settings.otel_endpoint)
    try:
        assert tracing.enabled
    finally:
        tracing.shutdown()
