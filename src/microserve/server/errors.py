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

log = logging.getLogger(__name__)

_STATUS_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


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


async def send_error(
    send: Send, status: int, message: str, *, headers: dict[str, str] | None = None, code: str | None = None
) -> None:
    """Answer from ASGI middleware with an OpenAI error body, before any route runs."""
    response = ErrorJSON(error_body(status, message, code=code), status_code=status, headers=headers)
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
    async def _service(_: Request, exc: ServiceError) -> JSONResponse:
        if exc.status_code >= 500:
            log.error("request failed: %s", exc.message)
        return ErrorJSON(exc.body(), status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(ClientDisconnected)
    async def _gone(_: Request, exc: ClientDisconnected) -> Response:
        # nginx's "client closed request": keeps disconnects out of the 5xx counts.
        return Response(status_code=499)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _describe(exc)
        return ErrorJSON(error_body(400, message, param=param), status_code=400)

    @app.exception_handler(HTTPException)
    async def _http(_: Request, exc: HTTPException) -> JSONResponse:
        return ErrorJSON(error_body(exc.status_code, str(exc.detail)), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return ErrorJSON(error_body(500, f"internal error: {type(exc).__name__}: {exc}"), status_code=500)


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
            await send_error(send, 500, f"internal error: {type(exc).__name__}: {exc}")
