"""Request body size limit, enforced on bytes before any parsing."""

from __future__ import annotations

from collections.abc import Mapping

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from microserve.errors import ServiceError
from microserve.server.errors import send_error


class BodyTooLarge(ServiceError):
    """A streamed upload went over its route's limit (413); raised from the body stream the route reads."""

    status_code = 413
    error_type = "invalid_request_error"


class BodyLimitMiddleware:
    """413 for bodies over ``max_bytes``: by ``Content-Length`` at once, else by counting chunks as they arrive.

    The body is buffered (it is at most ``max_bytes``) and replayed to the app, so a too-large body never reaches
    the JSON parser, whether the client sent a length or chunked transfer encoding.

    ``streamed`` names routes (POST paths) that take large bodies, each with its own limit: their bodies are not
    buffered but counted as the route reads them, and the read that goes over raises :class:`BodyTooLarge`.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, streamed: Mapping[str, int] | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.streamed = dict(streamed or {})

    async def _too_large(self, send: Send, limit: int, path: str) -> None:
        await send_error(
            send,
            413,
            f"The request body exceeds the limit of {limit} bytes.",
            code="request_too_large",
            path=path,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE"):
            await self.app(scope, receive, send)
            return
        limit = self.streamed.get(scope["path"], self.max_bytes)
        for name, value in scope.get("headers") or []:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared > limit:
                    await self._too_large(send, limit, scope["path"])
                    return
                break
        if scope["path"] in self.streamed:
            await self.app(scope, _counting(receive, limit), send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_bytes:
                await self._too_large(send, self.max_bytes, scope["path"])
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def _counting(receive: Receive, limit: int) -> Receive:
    size = 0

    async def counted() -> Message:
        nonlocal size
        message = await receive()
        if message["type"] == "http.request":
            size += len(message.get("body", b""))
            if size > limit:
                raise BodyTooLarge(f"The request body exceeds the limit of {limit} bytes.", code="request_too_large")
        return message

    return counted
