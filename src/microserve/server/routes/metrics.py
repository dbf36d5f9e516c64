"""Prometheus metrics at ``/v1/metrics`` (NIM's path) and ``/metrics`` (vLLM's and Prometheus' default)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from microserve.observability.metrics import Metrics
from microserve.protocol.common import ErrorResponse
from microserve.server.auth import METRICS_PATHS

router = APIRouter(tags=["health"])


async def metrics_endpoint(request: Request) -> Response:
    """Prometheus text format."""
    metrics: Metrics = request.app.state.metrics
    return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)


for _path in sorted(METRICS_PATHS):
    router.add_api_route(
        _path,
        metrics_endpoint,
        methods=["GET"],
        response_class=PlainTextResponse,
        summary="Prometheus metrics",
        responses={200: {"content": {"text/plain": {}}}, 401: {"model": ErrorResponse}},
    )
