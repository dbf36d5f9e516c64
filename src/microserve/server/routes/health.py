"""Health routes as Kubernetes probes and NIM clients expect them."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from microserve.server.errors import error_body

router = APIRouter(tags=["health"])


class HealthResponse(BaseModel):
    object: str = "health.response"
    message: str


@router.get("/v1/health/live", response_model=HealthResponse)
async def live() -> HealthResponse:
    """200 while the process serves HTTP."""
    return HealthResponse(message="live")


@router.get("/v1/health/ready", response_model=HealthResponse, responses={503: {"description": "not ready"}})
async def ready(request: Request) -> HealthResponse | JSONResponse:
    """200 once every model is loaded and warmed up; 503 before, and while draining."""
    state = request.app.state
    if state.drain.draining:
        return JSONResponse(error_body(503, "shutting down"), status_code=503)
    if state.load_error:
        return JSONResponse(error_body(503, f"model failed to load: {state.load_error}"), status_code=503)
    waiting = [m.name for m in state.models if not m.engine.ready]
    if waiting:
        return JSONResponse(error_body(503, f"loading: {', '.join(waiting)}"), status_code=503)
    if not state.loaded:
        return JSONResponse(error_body(503, "loading: LoRA adapters"), status_code=503)
    return HealthResponse(message="ready")


@router.get("/health", response_model=HealthResponse, responses={503: {"description": "not ready"}})
async def health(request: Request) -> HealthResponse | JSONResponse:
    """Alias of ``/v1/health/ready``."""
    return await ready(request)
