"""Every failure leaves the server as an OpenAI error body with the right status."""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from microserve.errors import ServiceError
from microserve.protocol.anthropic import ANTHROPIC_ERROR_TYPES

log = logging.getLogger(__name__)

_STATUS_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


# Routes that answer errors in Anthropic's shape, as Anthropic clients parse them.
ANTHROPIC_PREFIX = "/v1/messages"

# What an unknown route's 404 lists: the API families served and a route of each.
API_FAMILIES = (
    "OpenAI (/v1/chat/completions, /v1/completions, /v1/responses, /v1/embeddings, /v1/models)",
    "Anthropic (/v1/messages, /v1/messages/count_tokens)",
    "NIM (/v1/ranking, /v1/health/ready, /v1/metadata, /v1/metrics)",
    "Cohere/Jina (/v1/rerank)",
    "vLLM (/tokenize, /detokenize)",
)


class ErrorJSON(JSONResponse):
    """An error body in ASCII JSON: a message that quotes client text (a model name with a lone surrogate) still
    renders, where UTF-8 encoding would fail and turn a 404 into a 500."""

    def render(self, content: Any) -> bytes:
        """The body bytes."""
        return json.dumps(content, separators=(",", ":")).encode("ascii")


class ClientDisconnected(Exception):
    """The client went away before its response was ready; answered as 499 (nobody reads it) and logged so."""


def error_body(status: int, message: str, *, param: str | None = None, code: str | None = None) -> dict[str, dict]:
    """OpenAI's error shape for a status and message."""
    kind = _STATUS_TYPES.get(status, "internal_server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def anthropic_body(status: int, message: str) -> dict[str, object]:
    """Anthropic's error shape for a status and message."""
    kind = ANTHROPIC_ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


def body_for(path: str, status: int, message: str, *, param: str | None = None, code: str | None = None) -> Any:
    """The error body of a route: Anthropic's shape on the Messages routes, OpenAI's everywhere else."""
    if path.startswith(ANTHROPIC_PREFIX):
        return anthropic_body(status, message)
    return error_body(status, message, param=param, code=code)


async def send_error(
    send: Send,
    status: int,
    message: str,
    *,
    headers: dict[str, str] | None = None,
    code: str | None = None,
    path: str = "",
) -> None:
    """Answer from ASGI middleware with the route's error body, before any route runs."""
    response = ErrorJSON(body_for(path, status, message, code=code), status_code=status, headers=headers)
    await send({"type": "http.response.start", "status": status, "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})


def _describe(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request body", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON: {first.get('ctx', {}).get('error', 'parse error')}", None
    if not loc:
        return f"invalid request body: {first.get('msg')}", None
    param = ".".join(loc)
    return f"invalid value for `{param}`: {first.get('msg')}", param


def install_error_handlers(app: FastAPI) -> None:
    """Route pydantic, Starlette and service errors, and any bug, to OpenAI-shaped JSON."""

    @app.exception_handler(ServiceError)
    async def _service(request: Request, exc: ServiceError) -> JSONResponse:
        if exc.status_code >= 500:
            log.error("request failed: %s", exc.message)
        body: dict[str, object] = dict(exc.body())
        if request.url.path.startswith(ANTHROPIC_PREFIX):
            body = anthropic_body(exc.status_code, exc.message)
        return ErrorJSON(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(ClientDisconnected)
    async def _gone(_: Request, exc: ClientDisconnected) -> Response:
        # nginx's "client closed request": keeps disconnects out of the 5xx counts.
        return Response(status_code=499)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _describe(exc)
        return ErrorJSON(body_for(request.url.path, 400, message, param=param), status_code=400)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        message = str(exc.detail)
        where = f"{request.method} {request.url.path}"
        if exc.status_code == 404 and message == "Not Found":
            message = f"There is no route {where}. This server serves: {'; '.join(API_FAMILIES)}."
        elif exc.status_code == 405:
            allowed = (exc.headers or {}).get("allow") or (exc.headers or {}).get("Allow")
            message = f"{where} is not allowed" + (f"; {request.url.path} takes {allowed}" if allowed else "")
        return ErrorJSON(
            body_for(request.url.path, exc.status_code, message), status_code=exc.status_code, headers=exc.headers
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        message = f"internal error: {type(exc).__name__}: {exc}"
        return ErrorJSON(body_for(request.url.path, 500, message), status_code=500)


class UnhandledErrorMiddleware:
    """Answers an exception that no handler took with a 500 error body, and keeps the connection open.

    Starlette's last-resort handler answers and then raises the exception again, for the server to log; uvicorn
    then closes the connection, so the client's next request on the same keep-alive connection failed with a
    reset. Installed innermost, this answers first. A response already under way cannot be finished and is left
    to fail as before.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking)
        except Exception as exc:
            if started:
                raise
            log.exception("unhandled error")
            await send_error(send, 500, f"internal error: {type(exc).__name__}: {exc}", path=scope.get("path", ""))
