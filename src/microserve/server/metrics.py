"""Prometheus metrics under the names NIM and vLLM dashboards query, in a registry owned by the app."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from typing import Any, Generic, Protocol, TypeVar

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response

from microserve.engines.base import (
    EncoderEngine,
    EncoderInfo,
    EncoderInput,
    EncoderStats,
    EngineStats,
    GenerationDelta,
    GenerationRequest,
    ModelInfo,
    TextEngine,
)
from microserve.server.logging import current_record
from microserve.server.tracing import Tracing

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
_TOKEN_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)


TextLoad = Callable[[], Iterable[tuple[str, EngineStats, int]]]
EncoderLoad = Callable[[], Iterable[tuple[str, EncoderStats, int, int]]]


class _LoadCollector(Collector):
    """Gauges read from the engines and admission queues at scrape time, so they are never stale."""

    def __init__(self, sources: TextLoad, encoders: EncoderLoad | None = None) -> None:
        self._sources = sources
        self._encoders = encoders

    def collect(self) -> Iterable[Metric]:
        running = GaugeMetricFamily("num_requests_running", "Sequences decoding in the engine.", labels=["model_name"])
        waiting = GaugeMetricFamily(
            "num_requests_waiting", "Requests waiting for a slot (admission queue and engine).", labels=["model_name"]
        )
        kv = GaugeMetricFamily("kv_cache_usage_perc", "Fraction of KV-cache cells in use (0-1).", labels=["model_name"])
        prefix = CounterMetricFamily(
            "prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache.", labels=["model_name"]
        )
        for name, stats, queued in self._sources():
            running.add_metric([name], stats.running)
            waiting.add_metric([name], stats.waiting + queued)
            kv.add_metric([name], stats.kv_used / stats.kv_total if stats.kv_total else 0.0)
            prefix.add_metric([name], stats.prefix_hit_tokens)
        encoders = self._collect_encoders(self._encoders, running, waiting) if self._encoders is not None else []
        yield from (running, waiting, kv, prefix, *encoders)

    @staticmethod
    def _collect_encoders(
        encoders: EncoderLoad, running: GaugeMetricFamily, waiting: GaugeMetricFamily
    ) -> list[Metric]:
        passes = CounterMetricFamily(
            "encoder_forward_passes", "Forward passes of the sentence encoder.", labels=["model_name"]
        )
        inputs = CounterMetricFamily("encoder_inputs", "Inputs encoded (sentences or pairs).", labels=["model_name"])
        batch = GaugeMetricFamily(
            "encoder_mean_batch", "Inputs per forward pass since start (0 before the first).", labels=["model_name"]
        )
        for name, stats, admitted, queued in encoders():
            # Encoder requests share the request gauges: admitted requests run (a batch forms among them), requests
            # queued at the admission gate wait.
            running.add_metric([name], admitted)
            waiting.add_metric([name], queued)
            passes.add_metric([name], stats.forward_passes)
            inputs.add_metric([name], stats.inputs)
            batch.add_metric([name], stats.inputs / stats.forward_passes if stats.forward_passes else 0.0)
        return [passes, inputs, batch]


class Metrics:
    """Every metric of one app; nothing is registered globally, so several apps can live in one process."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.rejected = Counter(
            "num_requests_rejected", "Requests turned away by admission control.", ["model_name", "reason"], registry=r
        )
        self.prompt_tokens = Counter("prompt_tokens", "Prompt tokens processed.", ["model_name"], registry=r)
        self.generation_tokens = Counter("generation_tokens", "Tokens generated.", ["model_name"], registry=r)
        self.ttft = Histogram(
            "time_to_first_token_seconds",
            "Seconds from engine submission to the first token.",
            ["model_name"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "inter_token_latency_seconds",
            "Seconds between consecutive tokens of a sequence.",
            ["model_name"],
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "e2e_request_latency_seconds",
            "Seconds from admission to the last token, queueing included.",
            ["model_name"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            "request_queue_time_seconds",
            "Seconds a request waited for a slot.",
            ["model_name"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.success = Counter(
            "request_success", "Finished sequences by finish reason.", ["model_name", "finished_reason"], registry=r
        )
        self.http = Counter(
            "http_requests", "HTTP responses by method, route and status.", ["method", "path", "status"], registry=r
        )
        # Looking a child up by its label values takes a lock and a few microseconds; every response counts one.
        self._http_children: dict[tuple[str, str, int], Any] = {}

    def count_response(self, method: str, route: str, status: int) -> None:
        """Count one HTTP response."""
        key = (method, route, status)
        child = self._http_children.get(key)
        if child is None:
            child = self._http_children[key] = self.http.labels(method, route, str(status))
        child.inc()

    def watch_load(self, sources: TextLoad, encoders: EncoderLoad | None = None) -> None:
        """Register the scrape-time gauges over ``sources``: (model, engine stats, queued requests) tuples, and
        over ``encoders``: (model, encoder stats, admitted requests, queued requests) tuples."""
        self.registry.register(_LoadCollector(sources, encoders))

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)


async def metrics_endpoint(request: Request) -> Response:
    """``GET /v1/metrics`` and ``/metrics``: Prometheus text format."""
    metrics: Metrics = request.app.state.metrics
    return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)


class _Lifecycle(Protocol):
    @property
    def ready(self) -> bool: ...

    async def start(self) -> None: ...

    async def shutdown(self) -> None: ...


E = TypeVar("E", bound=_Lifecycle)


class _Wrapper(Generic[E]):
    """What an instrumented engine passes straight through to the engine it wraps: readiness and lifecycle."""

    def __init__(self, inner: E) -> None:
        self.inner = inner

    @property
    def ready(self) -> bool:
        """Whether the wrapped engine is ready."""
        return self.inner.ready

    async def start(self) -> None:
        """Start the wrapped engine."""
        await self.inner.start()

    async def shutdown(self) -> None:
        """Stop the wrapped engine."""
        await self.inner.shutdown()


class InstrumentedEncoder(_Wrapper[EncoderEngine]):
    """An EncoderEngine that counts the tokens of every request it encodes and names its model on the request's
    log line, as InstrumentedEngine does for generation, for every retrieval route alike."""

    def __init__(self, inner: EncoderEngine, model_name: str, metrics: Metrics) -> None:
        super().__init__(inner)
        self.model_name = model_name
        self._prompt_tokens = metrics.prompt_tokens.labels(model_name)

    @property
    def info(self) -> EncoderInfo:
        """The wrapped encoder's model facts."""
        return self.inner.info

    def tokenize(self, text: str) -> list[int]:
        """Tokenize with the wrapped encoder."""
        return self.inner.tokenize(text)

    def stats(self) -> EncoderStats:
        """The wrapped encoder's batching counters."""
        return self.inner.stats()

    async def encode(self, inputs: Sequence[EncoderInput]) -> list[list[float]]:
        """Encode with the wrapped encoder, counting the tokens it read."""
        rows = await self.inner.encode(inputs)
        tokens = sum(len(item.token_ids) for item in inputs)
        self._prompt_tokens.inc(tokens)
        record = current_record()
        if record is not None:
            record.model = self.model_name
            record.prompt_tokens += tokens
        return rows


class InstrumentedEngine(_Wrapper[TextEngine]):
    """A TextEngine that records token counts, latencies and finish reasons of every sequence it serves.

    Wrapping the engine, rather than each service, keeps the numbers right for every route that generates.
    """

    def __init__(self, inner: TextEngine, model_name: str, metrics: Metrics, tracing: Tracing) -> None:
        super().__init__(inner)
        self.model_name = model_name
        self._metrics = metrics
        self._tracing = tracing

    @property
    def info(self) -> ModelInfo:
        """The wrapped engine's model facts."""
        return self.inner.info

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool = True) -> list[int]:
        """Tokenize with the wrapped engine."""
        return self.inner.tokenize(text, add_special=add_special, parse_special=parse_special)

    def token_ids(self, text: str) -> list[int]:
        """Special-token ids from the wrapped engine."""
        return self.inner.token_ids(text)

    def stats(self) -> EngineStats:
        """The wrapped engine's load."""
        return self.inner.stats()

    def __getattr__(self, name: str) -> object:
        # Engine-specific extras (detokenize, piece, ...) stay reachable through the wrapper.
        return getattr(self.inner, name)

    async def check_grammar(self, grammar: str, triggers: tuple[str, ...] = ()) -> None:
        """Compile and cache a grammar with the wrapped engine."""
        await self.inner.check_grammar(grammar, triggers)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationDelta]:
        """The wrapped stream, measured per choice; an abandoned choice counts as finished_reason ``abort``.

        With ``n`` > 1 the choices share one prefill: prompt tokens count once, each choice is one finished
        sequence, and time to first token is the first token of any choice.
        """
        m = self._metrics
        name = self.model_name
        record = current_record()
        started = time.monotonic()
        first_token = False
        completion: dict[int, int] = {}
        last_at: dict[int, float] = {}
        finish: dict[int, str] = {}
        span = self._tracing.start(
            "engine.generate", {"gen_ai.request.model": name, "gen_ai.usage.input_tokens": len(request.prompt_tokens)}
        )
        # Counted as the tokens come, so that a rate over the counter follows long streams while they run.
        generated_tokens = m.generation_tokens.labels(name)
        try:
            async for delta in self.inner.generate(request):
                now = time.monotonic()
                i = delta.index
                done = completion.get(i, 0)
                new = max(delta.completion_tokens - done, 0)
                new_after_first = new
                if not first_token and new:
                    first_token = True
                    m.ttft.labels(name).observe(now - started)
                    if record is not None and record.ttft is None:
                        record.ttft = now - started
                if done == 0 and new:
                    new_after_first = new - 1
                # A coalesced delta carries several tokens: spread the gap over them.
                for _ in range(new_after_first):
                    m.itl.labels(name).observe((now - last_at.get(i, started)) / max(new, 1))
                if new:
                    generated_tokens.inc(new)
                completion[i] = delta.completion_tokens
                last_at[i] = now
                if delta.finish_reason is not None:
                    finish[i] = delta.finish_reason
                yield delta
        finally:
            generated = sum(completion.values())
            reasons = [finish.get(i, "abort") for i in range(max(request.n, 1))]
            m.prompt_tokens.labels(name).inc(len(request.prompt_tokens))
            for reason in reasons:
                m.success.labels(name, reason).inc()
            queued = record.queue_time if record is not None else 0.0
            m.e2e.labels(name).observe(time.monotonic() - started + queued)
            summary = ",".join(dict.fromkeys(reasons))
            if record is not None:
                record.model = name
                record.prompt_tokens += len(request.prompt_tokens)
                record.completion_tokens += generated
                record.finish_reason = summary
            span.set_attribute("gen_ai.usage.output_tokens", generated)
            span.set_attribute("gen_ai.response.finish_reason", summary)
            span.end()


def route_label(scope: Mapping[str, object]) -> str:
    """The matched route's template (bounded cardinality), or ``unmatched``."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "unmatched"
