"""Optional OpenTelemetry tracing: a span per request (HTTP), per service call, and per engine sequence.

Tracing is on when ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set (or a tracer provider is handed to the app, as tests do)
and the ``otel`` extra is installed; otherwise every span is a no-op that costs a function call.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any, Protocol, TypeVar

log = logging.getLogger(__name__)

AttributeValue = str | int | float | bool
T = TypeVar("T")


class Span(Protocol):
    """What the code sets on a span."""

    def set_attribute(self, key: str, value: AttributeValue) -> None:
        """Attach a key/value to the span."""

    def end(self) -> None:
        """Close the span."""


class _NoSpan:
    def set_attribute(self, key: str, value: AttributeValue) -> None:
        return None

    def end(self) -> None:
        return None


_NO_SPAN = _NoSpan()


class Tracing:
    """Spans through one tracer provider owned by the app (never the process-global provider)."""

    def __init__(self, provider: Any | None = None) -> None:
        self._tracer = provider.get_tracer("microserve") if provider is not None else None
        self.provider = provider

    @classmethod
    def from_endpoint(cls, endpoint: str | None, service_name: str = "microserve") -> Tracing:
        """Export spans over OTLP/HTTP to ``endpoint``; disabled (with a warning) without the ``otel`` extra."""
        if not endpoint:
            return cls(None)
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
        except ImportError:
            log.warning("OTEL_EXPORTER_OTLP_ENDPOINT is set but the `otel` extra is not installed; tracing is off")
            return cls(None)
        provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        # The exporter reads the endpoint (and headers) from the standard OTEL_* variables itself.
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        return cls(provider)

    @property
    def enabled(self) -> bool:
        """Whether spans are recorded."""
        return self._tracer is not None

    @contextlib.contextmanager
    def span(self, name: str, attributes: Mapping[str, AttributeValue] | None = None) -> Iterator[Span]:
        """A span that is a child of the current one (request → service → engine)."""
        if self._tracer is None:
            yield _NO_SPAN
            return
        with self._tracer.start_as_current_span(name, attributes=dict(attributes or {})) as span:
            yield span

    def start(self, name: str, attributes: Mapping[str, AttributeValue] | None = None) -> Span:
        """A span under the current one that the caller ends; for async generators, which may resume in another
        context and so must not make their span current."""
        if self._tracer is None:
            return _NO_SPAN
        span: Span = self._tracer.start_span(name, attributes=dict(attributes or {}))
        return span

    async def stream(
        self, chunks: AsyncIterator[T], name: str, attributes: Mapping[str, AttributeValue] | None = None
    ) -> AsyncIterator[T]:
        """Pass a stream through under a span that is current while each item is produced, so spans opened by
        the producer (the engine's) nest under it."""
        if self._tracer is None:
            async for chunk in chunks:
                yield chunk
            return
        from opentelemetry.trace import use_span

        span = self.start(name, attributes)
        try:
            while True:
                with use_span(span, end_on_exit=False):  # type: ignore[arg-type]
                    try:
                        chunk = await anext(chunks)
                    except StopAsyncIteration:
                        return
                yield chunk
        finally:
            span.end()

    def shutdown(self) -> None:
        """Flush and stop the exporter."""
        if self.provider is not None and hasattr(self.provider, "shutdown"):
            self.provider.shutdown()
