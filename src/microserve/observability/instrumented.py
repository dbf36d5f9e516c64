"""Engine wrappers that measure every sequence and encoding they serve, whichever route asked for it.

They implement the engine protocols in full, passing each call through explicitly, so a service cannot tell a
wrapped engine from a bare one, and nothing engine-specific leaks through them.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from typing import Generic, Protocol, TypeVar

from microserve.engines.base import (
    EncoderEngine,
    EncoderInfo,
    EncoderInput,
    EncoderStats,
    EngineStats,
    GenerationDelta,
    GenerationRequest,
    Guide,
    ModelInfo,
    PromptSegment,
    TextEngine,
)
from microserve.errors import ServiceError
from microserve.observability.metrics import Metrics
from microserve.observability.record import current_record
from microserve.observability.tracing import Tracing


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

    def single(self, ids: Sequence[int]) -> EncoderInput:
        """One text laid out by the wrapped encoder."""
        return self.inner.single(ids)

    def pair(self, first: Sequence[int], second: Sequence[int]) -> EncoderInput:
        """A pair laid out by the wrapped encoder."""
        return self.inner.pair(first, second)

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

    def encode_prompt(self, text: str) -> list[int]:
        """Tokenize a prompt with the wrapped engine."""
        return self.inner.encode_prompt(text)

    def encode_segments(self, segments: Sequence[PromptSegment]) -> list[int]:
        """Tokenize a segmented chat prompt with the wrapped engine."""
        return self.inner.encode_segments(segments)

    def token_ids(self, text: str) -> list[int]:
        """Special-token ids from the wrapped engine."""
        return self.inner.token_ids(text)

    def detokenize(self, ids: Sequence[int]) -> str:
        """Text of token ids from the wrapped engine."""
        return self.inner.detokenize(ids)

    def check_request(self, request: GenerationRequest) -> None:
        """Check a request with the wrapped engine; a refusal counts as a rejected request."""
        try:
            self.inner.check_request(request)
        except ServiceError as exc:
            if exc.status_code < 500:
                self._metrics.rejected.labels(self.model_name, "invalid_request").inc()
            raise

    def stats(self) -> EngineStats:
        """The wrapped engine's load."""
        return self.inner.stats()

    async def check_guide(self, guide: Guide) -> None:
        """Compile and cache an output constraint with the wrapped engine."""
        await self.inner.check_guide(guide)

    async def load_adapter(self, name: str, path: str) -> None:
        """Load an adapter into the wrapped engine."""
        await self.inner.load_adapter(name, path)

    async def unload_adapter(self, name: str) -> None:
        """Unload an adapter from the wrapped engine."""
        await self.inner.unload_adapter(name)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationDelta]:
        """The wrapped stream, measured per choice; an abandoned choice counts as finished_reason ``abort``.

        With ``n`` > 1 the choices share one prefill: prompt tokens count once, each choice is one finished
        sequence, and time to first token is the first token of any choice. A request the engine refuses before
        its first token (a client error that slipped past ``check_request``) counts as rejected, not as a
        finished sequence.
        """
        m = self._metrics
        name = self.model_name
        record = current_record()
        started = time.monotonic()
        first_token = False
        refused = False
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
        except ServiceError as exc:
            refused = exc.status_code < 500 and not completion
            raise
        finally:
            generated = sum(completion.values())
            reasons = [finish.get(i, "abort") for i in range(max(request.n, 1))]
            if refused:
                m.rejected.labels(name, "invalid_request").inc()
                reasons = ["rejected"]
            else:
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
