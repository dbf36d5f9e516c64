"""JSON bodies whose strings Python would read but could not write back: lone UTF-16 surrogates.

The standard library's JSON parser, which FastAPI uses, turns the escape ``"\\ud800"`` (and raw surrogate bytes,
which it decodes with ``surrogatepass``) into a str holding a lone surrogate. Such a str cannot be encoded as
UTF-8: the tokenizer, a log line or the error body that quotes it fails, and a client's typo became a 500. These
bodies are refused with a 400 before any route reads them, as pydantic-core's parser (the retrieval routes) refuses
them.
"""

from __future__ import annotations

import re

import pydantic_core
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from microserve.server.errors import send_error
from microserve.server.json_route import is_json

# A \\uXXXX escape of a surrogate (U+D800..U+DFFF). A paired one is valid; the full parse below tells them apart.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def text_problem(body: bytes) -> str | None:
    """Why ``body`` is not JSON text of valid Unicode (invalid UTF-8, a lone surrogate), or None."""
    if not body.isascii():
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as exc:
            return f"the body is not valid UTF-8 ({exc.reason} at byte {exc.start})"
    if _SURROGATE_ESCAPE.search(body) is None:
        return None
    try:
        pydantic_core.from_json(body)
    except ValueError as exc:
        return str(exc)
    return None


class BodyTextMiddleware:
    """400 for a JSON request body that is not valid Unicode text; other bodies pass untouched."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE"):
            await self.app(scope, receive, send)
            return
        content_type = next((v.decode("latin-1") for k, v in scope.get("headers") or [] if k == b"content-type"), None)
        if not is_json(content_type):
            await self.app(scope, receive, send)
            return
        messages: list[Message] = []
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request" or not message.get("more_body", False):
                break
        problem = text_problem(b"".join(m.get("body", b"") for m in messages if m["type"] == "http.request"))
        if problem is not None:
            await send_error(
                send, 400, f"the request body is not valid JSON: {problem}", code="invalid_json", path=scope["path"]
            )
            return

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)
