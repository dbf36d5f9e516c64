"""A lean route class for JSON endpoints that are called at high rates with small bodies.

FastAPI's general request handler decodes the body with the standard library's ``json``, resolves the endpoint's
parameters as dependencies (query string, cookies and headers included) and then validates the decoded tree. On the
retrieval routes, where one request may carry a single short sentence, that machinery was about a tenth of the
server's CPU per request, CPU that the encoder's forward passes need on a small machine. ``JsonBodyRoute`` validates
the raw bytes in one pydantic-core call and hands the model to the endpoint. The OpenAPI schema is still FastAPI's,
built from the endpoint's signature, and a malformed body is still a ``RequestValidationError`` (a 400 in OpenAI's
error shape), as on every other route. As FastAPI does by default, a body is read as JSON only when its
``Content-Type`` says so: a browser can send a ``text/plain`` or untyped POST to a server on localhost without a CORS
preflight, and such a request must not get to run a model.
"""

from __future__ import annotations

import typing
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import Response

Handler = Callable[[Request], Coroutine[Any, Any, Response]]
NOT_JSON = "the body must be JSON, sent with Content-Type: application/json"


def is_json(content_type: str | None) -> bool:
    """Whether a ``Content-Type`` names JSON: ``application/json`` or an ``application/*+json`` type."""
    if not content_type:
        return False
    mime = content_type.split(";", 1)[0].strip().lower()
    return mime == "application/json" or (mime.startswith("application/") and mime.endswith("+json"))


def body_model(endpoint: Callable[..., Any]) -> type[BaseModel]:
    """The pydantic model of ``endpoint``'s first parameter, which must be ``(body: Model, request: Request)``."""
    hints = typing.get_type_hints(endpoint)
    names = [name for name in hints if name != "return"]
    if len(names) != 2 or hints[names[1]] is not Request:
        raise TypeError(f"{endpoint.__qualname__} must take (body: <model>, request: Request)")
    model = hints[names[0]]
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        raise TypeError(f"{endpoint.__qualname__}: the body must be a pydantic model, not {model!r}")
    return model


class JsonBodyRoute(APIRoute):
    """An ``APIRoute`` whose endpoint is ``async (body, request) -> model | Response``, ``body`` parsed from the
    request's bytes by pydantic-core.

    A returned model is serialised as it is, honouring the route's ``response_model_exclude_none``; it is not
    validated again against ``response_model``, which here only documents the reply.
    """

    def get_route_handler(self) -> Handler:
        """The request handler FastAPI wraps with its exception handling."""
        model = body_model(self.endpoint)
        endpoint = self.endpoint
        exclude_none = self.response_model_exclude_none
        status = self.status_code or 200

        async def handler(request: Request) -> Response:
            raw = await request.body()
            if not is_json(request.headers.get("content-type")):
                raise RequestValidationError(
                    [{"type": "content_type", "loc": ("body",), "msg": NOT_JSON, "input": None}], body=raw
                )
            try:
                body = model.model_validate_json(raw)
            except ValidationError as exc:
                # Located under "body", as FastAPI reports errors of a body parameter.
                errors = [{**error, "loc": ("body", *error["loc"])} for error in exc.errors(include_url=False)]
                raise RequestValidationError(errors, body=raw) from None
            reply = await endpoint(body, request)
            if isinstance(reply, Response):
                return reply
            return Response(
                reply.model_dump_json(exclude_none=exclude_none), status_code=status, media_type="application/json"
            )

        return handler
