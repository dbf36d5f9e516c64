"""A request the engine refuses before its first token counts as rejected, never as a finished ("abort") sequence."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from microserve.engines.base import GenerationDelta, GenerationRequest, SamplingParams
from microserve.errors import EngineFailure, InvalidRequest, ServiceError
from microserve.observability.instrumented import InstrumentedEngine
from microserve.observability.metrics import Metrics
from microserve.observability.tracing import Tracing


class Refusing:
    """Just enough of a TextEngine: its check and its stream raise ``error`` before any token."""

    def __init__(self, error: ServiceError) -> None:
        self.error = error

    def check_request(self, request: GenerationRequest) -> None:
        raise self.error

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationDelta]:
        raise self.error
        yield  # pragma: no cover - makes this an async generator


def _count(metrics: Metrics, name: str, labels: dict[str, str]) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


@pytest.mark.parametrize(
    ("error", "rejected", "aborted"),
    [(InvalidRequest("the prompt is empty", param="prompt"), 1.0, 0.0), (EngineFailure("boom"), 0.0, 1.0)],
)
def test_refusals_are_rejected_and_failures_still_abort(error: ServiceError, rejected: float, aborted: float) -> None:
    metrics = Metrics()
    engine: Any = InstrumentedEngine(Refusing(error), "m", metrics, Tracing())  # type: ignore[arg-type]
    request = GenerationRequest("r", [], SamplingParams(max_tokens=1))

    async def run() -> None:
        async for _ in engine.generate(request):
            pass

    with pytest.raises(ServiceError):
        asyncio.run(run())
    labels = {"model_name": "m"}
    assert _count(metrics, "num_requests_rejected_total", {**labels, "reason": "invalid_request"}) == rejected
    assert _count(metrics, "request_success_total", {**labels, "finished_reason": "abort"}) == aborted


def test_a_request_the_engine_check_refuses_counts_as_rejected() -> None:
    metrics = Metrics()
    engine: Any = InstrumentedEngine(Refusing(InvalidRequest("x")), "m", metrics, Tracing())  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest):
        engine.check_request(GenerationRequest("r", [], SamplingParams(max_tokens=1)))
    labels = {"model_name": "m", "reason": "invalid_request"}
    assert _count(metrics, "num_requests_rejected_total", labels) == 1.0
