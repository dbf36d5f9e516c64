"""An HTTP request carried from the ingress to a replica, and the replica side that serves it with an ASGI app
in its own process: no second HTTP hop, no port per replica.

The ingress reads the whole body (it needs it for the prefix key anyway), so the request crosses as one value; the
response comes back as a stream: first a :class:`ResponseStart` (status and headers), then body chunks as the app
sends them, so server-sent events reach the client as they are produced.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from microserve.scale.prefix import PrefixKey

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class ForwardedRequest:
    """What the ingress sends a replica: the raw request and the prefix key the router reads."""

    method: str
    path: str
    query_string: bytes = b""
    headers: tuple[tuple[bytes, bytes], ...] = ()
    body: bytes = b""
    prefix_key: PrefixKey | None = None
    client: tuple[str, int] | None = None


@dataclass(frozen=True, slots=True)
class ResponseStart:
    """The status line and headers of a replica's response."""

    status: int
    headers: tuple[tuple[bytes, bytes], ...] = field(default_factory=tuple)


def _scope(request: ForwardedRequest) -> Scope:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": request.method,
        "scheme": "http",
        "path": request.path,
        "raw_path": request.path.encode(),
        "root_path": "",
        "query_string": request.query_string,
        "headers": [(k.lower(), v) for k, v in request.headers],
        "client": request.client,
        "server": ("ray-serve", 0),
        "state": {},
    }


async def serve_asgi(app: ASGIApp, request: ForwardedRequest) -> AsyncIterator[ResponseStart | bytes]:
    """Run ``request`` through ``app``; yield the response start, then each body chunk.

    When the consumer stops early (the client left, so Ray cancels the stream), the app sees ``http.disconnect``
    and its task is cancelled, as under a real server: microserve then frees the engine sequence.
    """
    out: asyncio.Queue[Message | None] = asyncio.Queue()
    disconnected = asyncio.Event()
    body_sent = False

    async def receive() -> Message:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        await out.put(message)

    failure: list[BaseException] = []

    async def run() -> None:
        try:
            await app(_scope(request), receive, send)
        except Exception as exc:
            failure.append(exc)
        finally:
            await out.put(None)

    task = asyncio.create_task(run())
    started = False
    try:
        while True:
            message = await out.get()
            if message is None:
                break
            if message["type"] == "http.response.start":
                started = True
                yield ResponseStart(message["status"], tuple((bytes(k), bytes(v)) for k, v in message["headers"]))
            elif message["type"] == "http.response.body":
                chunk = message.get("body", b"")
                if chunk:
                    yield bytes(chunk)
                if not message.get("more_body", False):
                    break
        # The response is complete: a listener still waiting for the client's disconnect may now have it.
        disconnected.set()
        await task
        if failure and not started:
            raise failure[0]
        if failure:
            # As under a server: the app answered (Starlette sends its 500 first), then raised; log it.
            log.error("the app raised after answering", exc_info=failure[0])
        if not started:
            raise RuntimeError("the app finished without sending a response")
    finally:
        disconnected.set()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


class Lifespan:
    """An ASGI app's lifespan protocol, driven in-process: ``startup`` before the first request, ``shutdown`` at
    the end (for microserve: load the engines; drain and free them)."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app
        self._inbox: asyncio.Queue[Message] = asyncio.Queue()
        self._outbox: asyncio.Queue[Message] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    async def startup(self) -> None:
        """Run the app's startup; raises what the app reported if it failed."""
        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": {}}

        async def run() -> None:
            try:
                await self._app(scope, self._inbox.get, self._outbox.put)
            except Exception as exc:
                await self._outbox.put({"type": "lifespan.startup.failed", "message": f"{type(exc).__name__}: {exc}"})

        self._task = asyncio.create_task(run())
        await self._inbox.put({"type": "lifespan.startup"})
        reply = await self._outbox.get()
        if reply["type"] != "lifespan.startup.complete":
            raise RuntimeError(f"the app failed to start: {reply.get('message', reply['type'])}")

    async def shutdown(self) -> None:
        """Run the app's shutdown and wait for it."""
        if self._task is None or self._task.done():
            return
        await self._inbox.put({"type": "lifespan.shutdown"})
        reply = await self._outbox.get()
        if reply["type"] != "lifespan.shutdown.complete":
            log.warning("the app's shutdown failed: %s", reply.get("message", reply["type"]))
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._task


async def call(app: ASGIApp, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
    """A whole request through ``app`` in-process: the status and the body (health checks, metrics)."""
    status, parts = 500, []
    async for item in serve_asgi(app, ForwardedRequest(method, path, body=body)):
        if isinstance(item, ResponseStart):
            status = item.status
        else:
            parts.append(item)
    return status, b"".join(parts)
