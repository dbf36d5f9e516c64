"""Cross-origin requests from browsers, off until origins are allowed (``cors_allow_origins``).

Preflights (``OPTIONS`` with ``Access-Control-Request-Method``) from an allowed origin are answered here, before the
API key is checked, since browsers send them without credentials; the request that follows still needs its key.
A preflight from any other origin, or asking for a method or header that is not allowed, gets 403 and no CORS
headers, so the browser refuses the request; other requests from such origins are served without CORS headers,
which keeps a browser from reading the reply.
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from microserve.server.errors import send_error

MAX_AGE = "600"
# Headers a browser script may read from a reply: the request id, and how long to wait when turned away.
EXPOSED = "x-request-id, retry-after"


class CorsMiddleware:
    """Adds CORS headers for allowed origins and answers their preflights; ``*`` allows any origin, method or
    header."""

    def __init__(self, app: ASGIApp, origins: list[str], methods: list[str], headers: list[str]) -> None:
        self.app = app
        self.any_origin = "*" in origins
        self.origins = frozenset(origins)
        self.any_method = "*" in methods
        self.methods = [m.upper() for m in methods if m != "*"]
        self.any_header = "*" in headers
        self.headers = frozenset(h.lower() for h in headers if h != "*")

    def _allowed(self, origin: str) -> bool:
        return self.any_origin or origin in self.origins

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        origin = headers.get("origin")
        if origin is None:
            await self.app(scope, receive, send)
            return
        requested = headers.get("access-control-request-method")
        if scope["method"] == "OPTIONS" and requested is not None:
            await self._preflight(origin, requested, headers.get("access-control-request-headers", ""), send)
            return
        if not self._allowed(origin):
            await self.app(scope, receive, send)
            return

        async def send_with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [
                    *message.get("headers", []),
                    (b"access-control-allow-origin", origin.encode("latin-1")),
                    (b"access-control-expose-headers", EXPOSED.encode()),
                    (b"vary", b"Origin"),
                ]
            await send(message)

        await self.app(scope, receive, send_with_cors)

    async def _preflight(self, origin: str, method: str, wanted: str, send: Send) -> None:
        asked = [h.strip().lower() for h in wanted.split(",") if h.strip()]
        refusal = None
        if not self._allowed(origin):
            refusal = f"cross-origin requests from {origin} are not allowed"
        elif not self.any_method and method.upper() not in self.methods:
            refusal = f"cross-origin {method} requests are not allowed"
        elif not self.any_header and (bad := [h for h in asked if h not in self.headers]):
            refusal = f"cross-origin requests may not send the header(s) {', '.join(bad)}"
        if refusal is not None:
            await send_error(send, 403, refusal, code="cors_not_allowed")
            return
        allow_methods = method.upper() if self.any_method else ", ".join(self.methods)
        allow_headers = ", ".join(asked) if self.any_header else ", ".join(sorted(self.headers))
        response = [
            (b"access-control-allow-origin", origin.encode("latin-1")),
            (b"access-control-allow-methods", allow_methods.encode("latin-1")),
            (b"access-control-max-age", MAX_AGE.encode()),
            (b"vary", b"Origin"),
            (b"content-length", b"0"),
        ]
        if allow_headers:
            response.append((b"access-control-allow-headers", allow_headers.encode("latin-1")))
        await send({"type": "http.response.start", "status": 204, "headers": response})
        await send({"type": "http.response.body", "body": b""})
